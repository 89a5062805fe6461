#!/usr/bin/env python3
"""PyTorch reference for benches/train_step.rs: one SGD step (forward, MSE loss as in the paper,
backward, update) of the MLP 3072-512-512-10 at batch 8/64/512 and the 5-layer CNN at batch 8/64,
float32 on the CPU. Prints a table, or with --json a {"mlp/8": ms, ...} object of median ms per step.

Usage: python3 bench/torch_step.py [--json] [--threads N]
"""
import argparse
import json
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    sys.exit("PyTorch is not installed (pip install torch)")


class MLP(nn.Module):
    # Same state_dict names as eoss's checkpoints: layers.{i}.weight / bias.
    def __init__(self, input_dim=3072, width=512, depth=2, outputs=10):
        super().__init__()
        dims = [input_dim] + [width] * depth + [outputs]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    def __init__(self, channels=3, side=32, outputs=10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3)
        self.conv2 = nn.Conv2d(64, 64, 3)
        self.conv3 = nn.Conv2d(64, 128, 3)
        s = ((side - 4) // 2 - 2) // 2
        self.fc1 = nn.Linear(128 * s * s, 512)
        self.fc2 = nn.Linear(512, outputs)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.max_pool2d(x, 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


CASES = [("mlp", MLP, 8), ("mlp", MLP, 64), ("mlp", MLP, 512), ("cnn", CNN, 8), ("cnn", CNN, 64)]


def median_ms(make, batch, reps):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, 32, 32)
    y = F.one_hot(torch.arange(batch) % 10, 10).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[reps // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="print a JSON object of ms per step")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {}
    for name, make, batch in CASES:
        reps = 11 if (batch >= 512 or name == "cnn") else 51
        result[f"{name}/{batch}"] = median_ms(make, batch, reps)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for k, v in result.items():
            print(f"{k:<10} {v:8.2f} ms")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch side of `eoss bench`: times the same cases as eoss, the same way.

`eoss bench --torch PYTHON` embeds this file, writes it to a temporary file and runs
`PYTHON script.py SPEC_JSON`, where SPEC_JSON is
{"device", "seconds", "cases": [{"name", "op", "model", "size"}], "sharpness_batches",
 "sharpness_batch_size", "lanczos_tol", "lanczos_max_iter", "warm_step_lr", "cnn_chunk",
 "long_case_s"}.
The last line printed is a JSON object {name: {"ms": median ms, "hvps": count or null}}.

Cases (op): sgd_step (forward, the paper's MSE, backward, torch.optim.SGD step on a batch of size),
evaluate (the outputs of size samples and their mean MSE under torch.no_grad),
hvp (one Hessian-vector product on size samples, the graph of the gradient kept; for the CNN on
more than cnn_chunk samples, chunk by chunk with each chunk's graph rebuilt, as eoss does), hvp_rebuilt
(forward + backward with graph + one HVP), lambda_max_cold / lambda_max_warm (Lanczos with full
reorthogonalisation and the same relative-residual stop as eoss; warm: after one full-batch gradient
step, started from the previous top eigenvector), batch_sharpness (mean of g_B' H_B g_B / |g_B|^2
over a fixed number of random batches), alignment (the gradients of output 0 of each of size
samples by torch.func's vmap of grad, and their Gram matrix).
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
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


class BasicBlock(nn.Module):
    def __init__(self, inp, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.pad = planes - inp
        self.stride = stride

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        short = x[:, :, ::self.stride, ::self.stride]
        short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNet(nn.Module):
    """The CIFAR ResNet without BatchNorm, option-A shortcuts (eoss's `nn::models::ResNet`)."""

    def __init__(self, depth=20, channels=3, outputs=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        blocks, inp = [], 16
        for s, planes in enumerate([16, 32, 64]):
            for b in range(n):
                blocks.append(BasicBlock(inp, planes, 2 if (s > 0 and b == 0) else 1))
                inp = planes
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(64, outputs)

    def forward(self, x):
        x = self.blocks(F.relu(self.conv1(x)))
        return self.linear(x.mean((2, 3)))


def build(name):
    if name == "cnn":
        return CNN()
    if name == "resnet20":
        return ResNet(20)
    return MLP()


def mse(out, y):
    return ((out - y) ** 2).sum(1).mean()


def setup(case, device):
    torch.manual_seed(0)
    model = build(case["model"]).to(device)
    n = case["size"]
    x = torch.randn(n, 3, 32, 32).to(device)
    y = F.one_hot(torch.arange(n) % 10, 10).float().to(device)
    return model, x, y


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device, seconds, f, long_case_s):
    t = time.perf_counter()
    hvps = f()
    sync(device)
    first = time.perf_counter() - t
    # A first run longer than long_case_s counts as a repetition instead of a warm-up.
    times = [first * 1e3] if first > long_case_s else []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 200):
        t = time.perf_counter()
        f()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2], hvps


def grad_with_graph(model, x, y):
    params = list(model.parameters())
    loss = mse(model(x), y)
    return params, torch.autograd.grad(loss, params, create_graph=True)


def hvp(params, grads, v):
    return torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b)).item()


def lanczos(apply, start, tol, max_iter):
    """Top eigenvalue by Lanczos with full reorthogonalisation (twice), as eoss does."""
    norm = dot(start, start) ** 0.5
    basis = [[s / norm for s in start]]
    alpha, beta = [], []
    for j in range(max_iter):
        q = basis[j]
        w = list(apply(q))
        a = dot(q, w)
        alpha.append(a)
        w = [wi - a * qi for wi, qi in zip(w, q)]
        if j > 0:
            w = [wi - beta[j - 1] * pi for wi, pi in zip(w, basis[j - 1])]
        for _ in range(2):
            for b in basis:
                c = dot(b, w)
                w = [wi - c * bi for wi, bi in zip(w, b)]
        bnorm = dot(w, w) ** 0.5
        t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
        if beta:
            off = torch.tensor(beta, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        vals, vecs = torch.linalg.eigh(t)
        theta, s_last = vals[-1].item(), vecs[-1, -1].item()
        if abs(bnorm * s_last) <= tol * abs(theta) or j + 1 == max_iter:
            coeff = vecs[:, -1]
            vec = [sum(coeff[i].item() * basis[i][p] for i in range(len(basis))) for p in range(len(q))]
            return theta, vec, j + 1
        beta.append(bnorm)
        basis.append([wi / bnorm for wi in w])


def chunked_hvp(model, x, y, chunk):
    """One HVP of the mean loss over x, chunk by chunk, each chunk's graph built and dropped."""
    n, total = x.shape[0], None
    v = None
    for s in range(0, n, chunk):
        params, grads = grad_with_graph(model, x[s:s + chunk], y[s:s + chunk])
        if v is None:
            v = [g.detach() for g in grads]
        w = x[s:s + chunk].shape[0] / n
        h = [w * t for t in hvp(params, grads, v)]
        total = h if total is None else [a + b for a, b in zip(total, h)]
    return total


def run_case(case, spec, device):
    op, seconds = case["op"], spec["seconds"]
    model, x, y = setup(case, device)
    long_case_s = spec["long_case_s"]

    def median_ms(device, seconds, f):
        return timed(device, seconds, f, long_case_s)

    tol, max_iter = spec["lanczos_tol"], spec["lanczos_max_iter"]
    if op == "sgd_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            mse(model(x), y).backward()
            opt.step()
            return None

        return median_ms(device, seconds, step)
    if op == "evaluate":
        def evaluate():
            with torch.no_grad():
                mse(model(x), y).item()
            return None

        return median_ms(device, seconds, evaluate)
    if op in ("hvp", "hvp_autodiff") and case["model"] != "mlp" and x.shape[0] > spec["cnn_chunk"]:
        return median_ms(device, seconds, lambda: (chunked_hvp(model, x, y, spec["cnn_chunk"]), 1)[1])
    if op in ("hvp", "hvp_autodiff"):
        params, grads = grad_with_graph(model, x, y)
        v = [g.detach() for g in grads]
        return median_ms(device, seconds, lambda: (hvp(params, grads, v), 1)[1])
    if op == "hvp_rebuilt":
        def rebuilt():
            params, grads = grad_with_graph(model, x, y)
            hvp(params, grads, [g.detach() for g in grads])
            return 1

        return median_ms(device, seconds, rebuilt)
    if op in ("lambda_max_cold", "lambda_max_warm"):
        params, grads = grad_with_graph(model, x, y)
        start = [torch.randn_like(p) for p in params]
        if op == "lambda_max_warm":
            _, start, _ = lanczos(lambda v: hvp(params, grads, v), start, tol, max_iter)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= spec["warm_step_lr"] * g

        def solve():
            p, g = grad_with_graph(model, x, y)
            return lanczos(lambda v: hvp(p, g, v), start, tol, max_iter)[2]

        return median_ms(device, seconds, solve)
    if op == "batch_sharpness":
        count, b = spec["sharpness_batches"], spec["sharpness_batch_size"]
        gen = torch.Generator().manual_seed(0)

        def estimate():
            total = 0.0
            for _ in range(count):
                rows = torch.randperm(x.shape[0], generator=gen)[:b].to(device)
                params, grads = grad_with_graph(model, x[rows], y[rows])
                g = [t.detach() for t in grads]
                total += dot(g, hvp(params, grads, g)) / dot(g, g)
            return count

        return median_ms(device, seconds, estimate)
    if op == "alignment":
        from torch.func import functional_call, grad, vmap

        params = {k: p.detach() for k, p in model.named_parameters()}

        def output0(p, xi):
            return functional_call(model, p, (xi.unsqueeze(0),))[0, 0]

        def gram():
            rows = vmap(grad(output0), in_dims=(None, 0))(params, x)
            flat = torch.cat([g.flatten(1) for g in rows.values()], 1)
            (flat @ flat.T).sum().item()
            return None

        return median_ms(device, seconds, gram)
    raise SystemExit(f"unknown case op {op!r}")


def main():
    spec = json.loads(sys.argv[1])
    device = spec["device"]
    result = {}
    for case in spec["cases"]:
        ms, hvps = run_case(case, spec, device)
        result[case["name"]] = {"ms": ms, "hvps": hvps}
        print(f"{case['name']:<28} {ms:10.3f} ms", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Compares the `train` runs of two `eoss run --report` files stage by stage (standard library only).

    python3 tools/compare_metrics.py STORE CPU_REPORT CUDA_REPORT

For every stage name of kind `train` in both reports, reads `STORE/train/<key>/metrics.csv` of each
and prints, per measured column, its values at step 0 on either side with their relative difference,
and the largest relative difference over the first ten steps and over the whole run (the runs share
their initialisation and batches, so step 0 agrees to f32 rounding and the rest drifts slowly).
Exits non-zero when a report or a metrics file is missing, or two runs share no step.
"""

import csv
import json
import sys
from pathlib import Path

COLUMNS = [
    "loss",
    "full_loss",
    "full_accuracy",
    "lambda_max",
    "batch_sharpness",
    "step_sharpness",
    "lambda_max_b",
    "lambda_max_b_max",
]


def train_runs(report):
    stages = json.loads(Path(report).read_text())["stages"]
    return {s["name"]: s["key"] for s in stages if s["kind"] == "train"}


def metrics(store, key):
    with open(Path(store) / "train" / key / "metrics.csv", newline="") as f:
        rows = {}
        for row in csv.DictReader(f):
            rows[int(row["step"])] = {c: float(row[c]) for c in COLUMNS if row.get(c)}
        return rows


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def compare(name, a, b):
    steps = sorted(set(a) & set(b))
    if not steps:
        sys.exit(f"{name}: the two runs share no step")
    print(f"{name}: steps {steps[0]}..{steps[-1]}")
    print(f"  {'column':<18}{'step 0 (1st)':>16}{'step 0 (2nd)':>16}{'rel':>10}{'max ≤10':>10}{'max all':>10}")
    for column in COLUMNS:
        pairs = [(s, a[s][column], b[s][column]) for s in steps if column in a[s] and column in b[s]]
        if not pairs:
            continue
        first = [rel(x, y) for s, x, y in pairs if s <= 10]
        every = [rel(x, y) for _, x, y in pairs]
        at0 = [(x, y) for s, x, y in pairs if s == 0]
        x0, y0 = at0[0] if at0 else (float("nan"), float("nan"))
        early = f"{max(first):.1e}" if first else "-"
        print(
            f"  {column:<18}{x0:>16.7g}{y0:>16.7g}{rel(x0, y0) if at0 else float('nan'):>10.1e}"
            f"{early:>10}{max(every):>10.1e}"
        )


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    store, first, second = sys.argv[1:]
    runs_a, runs_b = train_runs(first), train_runs(second)
    shared = [n for n in runs_a if n in runs_b]
    if not shared:
        sys.exit("no train stage in both reports")
    for name in shared:
        compare(name, metrics(store, runs_a[name]), metrics(store, runs_b[name]))


if __name__ == "__main__":
    main()

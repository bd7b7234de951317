"""The same FedAvg run under `fedsq run` and under Flower's simulation engine (fedsq.flower), side by side.

Each repeat runs both, each in a fresh process (engine first in even repeats, Flower first in
odd ones), on one config: digits at 32 px, ResNet-18 from scratch, FedAvg, 10 clients
Dirichlet 0.5, 5 rounds, every client every round, one client training at a time (the
engine's loop; Flower's simulation given one ClientApp at a time on all cores). Measured per
run: wall time of the whole command (start-up included), the peak of the process tree's
summed RSS, and its largest process's peak RSS (sampled every 0.1 s; Ray's workers are in
the tree). Printed: medians over repeats and the ratios Flower / engine, and both runs' best
validation accuracy (equal runs should learn equally: the Flower app keeps the engine's
BatchNorm policy).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_flower.py [--repeats 3] [--rounds 5] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

FORMS = ("engine", "flower")


def command(form: str, cfg_path: Path, out: Path) -> list[str]:
    """`fedsq run`, or `fedsq flower simulate` (one ClientApp at a time on all cores)."""
    verb = ["run"] if form == "engine" else ["flower", "simulate"]
    return [sys.executable, "-m", "fedsq", *verb, "--config", str(cfg_path), "--out", str(out)]


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (tree sum, largest process) of ``cmd`` until it exits."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak_tree, peak_one = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:  # a process ended between listing and reading
            rss = []
        peak_tree, peak_one = max(peak_tree, sum(rss)), max(peak_one, max(rss, default=0))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    return {"seconds": seconds, "tree_gib": peak_tree / 2**30, "largest_gib": peak_one / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()

    from fedsq import config, data

    results = {form: [] for form in FORMS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data.prepare("digits", tmp / "data")
        cfg = config.load({
            "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
            "split": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": args.clients}, "rounds": args.rounds,
            "method": {"name": "fedavg"}, "optimizer": {"lr": 0.05}, "device": "cpu", "eval": {"drift_every": 0},
            "paths": {"data": str(tmp / "data")}, "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        })
        cfg_path = tmp / "fedavg.yaml"
        cfg_path.write_text(json.dumps(cfg))
        for repeat in range(args.repeats):
            for form in FORMS if repeat % 2 == 0 else FORMS[::-1]:
                out = tmp / f"{form}{repeat}"
                result = measure(command(form, cfg_path, out))
                result["best_val_acc"] = json.loads((out / "summary.json").read_text())["best_val_acc"]
                results[form].append(result)
                print(f"repeat {repeat} {form:>6}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)

    median = {form: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for form, runs in results.items()}
    print(f"\nFedAvg, digits 32 px, resnet18 from scratch, {args.clients} clients Dir 0.5, {args.rounds} rounds; "
          f"medians of {args.repeats}, alternating")
    print(f"{'':>24}{'fedsq run':>12}{'Flower sim':>12}{'ratio':>8}")
    for key, label in (("seconds", "wall time (s)"), ("tree_gib", "peak RSS, tree (GiB)"),
                       ("largest_gib", "largest process (GiB)"), ("best_val_acc", "best val acc")):
        a, b = median["engine"][key], median["flower"][key]
        print(f"{label:>24}{a:>12.3f}{b:>12.3f}{b / a:>8.2f}")


if __name__ == "__main__":
    main()

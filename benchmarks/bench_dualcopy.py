"""Cost of DualCopy: one training step of DualCopy vs the plain model, on CPU.

Each (backbone, form) is measured in a fresh subprocess, so that its peak resident memory
(``ru_maxrss``) is its own; forms alternate over repeats so that load from other processes
hits both alike, and the table reports medians.

    PYTHONPATH=$PWD python benchmarks/bench_dualcopy.py [--repeats 5] [--steps 10] [--threads 2]

On a machine shared with other jobs, two OpenMP threads spin and stall: the wall-time
ratio then says little; ``--threads 1`` and the CPU-time column are the stable figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

BACKBONES = ("resnet18", "efficientnet_lite0")
FORMS = ("plain", "dualcopy")


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(backbone: str, form: str, *, steps: int, batch: int, image_size: int, threads: int) -> dict:
    """Median wall and CPU time and the memory of ``steps`` SGD steps (after warm-up), in this process.

    CPU time (all threads of this process) is less disturbed than wall time by other
    processes on a shared machine; ``step_mib`` is the peak RSS above the RSS before training
    (gradients, optimizer state, activations, masks).
    """
    import torch
    import torch.nn.functional as F

    from fedsq import models
    from fedsq.dualcopy import DualCopy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = models.efficientnet_lite0_pip_file() if backbone == "efficientnet_lite0" else None
    model = models.build(backbone, 10, path)
    if form == "dualcopy":
        model = DualCopy(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    before = _resident_mib()
    step()  # warm-up: allocator, optimizer state
    wall, cpu = [], []
    for _ in range(steps):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_mib": peak, "step_mib": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="subprocesses per (backbone, form)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per subprocess")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--child", nargs=2, metavar=("BACKBONE", "FORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = dict(steps=args.steps, batch=args.batch, image_size=args.image_size, threads=args.threads)
    if args.child:
        print(json.dumps(measure(*args.child, **settings)))
        return

    results = {(b, f): [] for b in args.backbones for f in FORMS}
    for _ in range(args.repeats):
        for backbone in args.backbones:
            for form in FORMS:
                child = [sys.executable, __file__, "--child", backbone, form] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in settings.items()
                ]
                out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
                results[backbone, form].append(json.loads(out.splitlines()[-1]))

    print(f"one SGD step, batch {args.batch}, {args.image_size} px, CPU, {args.threads} threads; "
          f"median of {args.repeats} processes x {args.steps} steps")
    columns = ("step_s", "cpu_s", "peak_mib", "step_mib")
    print(f"{'backbone':<20}{'form':<10}{'wall ms':>9}{'ratio':>7}{'CPU ms':>9}{'ratio':>7}{'peak RSS MiB':>14}{'step MiB':>10}")
    for backbone in args.backbones:
        median = {
            form: {c: statistics.median(r[c] for r in results[backbone, form]) for c in columns} for form in FORMS
        }
        plain = median["plain"]
        for form, m in median.items():
            print(
                f"{backbone:<20}{form:<10}{1000 * m['step_s']:>9.1f}{m['step_s'] / plain['step_s']:>7.2f}"
                f"{1000 * m['cpu_s']:>9.1f}{m['cpu_s'] / plain['cpu_s']:>7.2f}{m['peak_mib']:>14.0f}{m['step_mib']:>10.0f}"
            )


if __name__ == "__main__":
    main()

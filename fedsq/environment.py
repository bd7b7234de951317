"""What a run executes on, for its MLflow tags: software versions and the device's name.

Collected on the training thread, which knows its device, before the run's writer thread logs
them. Package versions come from ``importlib.metadata``, which reads the installed distributions
without importing them (MLflow is imported on the writer thread, not here).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "timm", "mlflow", "snakemake")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, where platform.processor() says only x86_64)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe(device: torch.device) -> dict[str, str]:
    """Tags ``env.*``: versions of Python, the key packages, CUDA and cuDNN ("none" where absent or
    a CPU build), the name of ``device``, and CUDA_VISIBLE_DEVICES (which GPU that is) when set."""
    cudnn = torch.backends.cudnn.version()
    tags = {"env.python": platform.python_version()} | {f"env.{p}": _version(p) for p in PACKAGES} | {
        "env.cuda": torch.version.cuda or "none",
        "env.cudnn": "none" if cudnn is None else str(cudnn),
        "env.device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
    }
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        tags["env.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags

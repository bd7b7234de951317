"""What a run executes on, for its MLflow tags: software versions and the device's name; and
what the NVIDIA driver shows, for the one line a run that cannot have its GPU stops with.

Collected on the training thread, which knows its device, before the run's writer thread logs
them. Package versions come from ``importlib.metadata``, which reads the installed distributions
without importing them (MLflow is imported on the writer thread, not here).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
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


def nvidia_gpus() -> tuple[str | None, list[str]]:
    """(driver version, GPU names) as the NVIDIA driver reports them, whether or not torch can use
    them: ``nvidia-smi`` where it is on PATH, else NVML (``pynvml``) where importable; (None, [])
    where neither finds a GPU."""
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):  # a driver without GPUs, or a hung one
            return None, []
        rows = [line.split(",", 1) for line in listed.splitlines() if "," in line]
        return (rows[0][0].strip() if rows else None), [name.strip() for _, name in rows]
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, or no driver to talk to
        return None, []
    try:
        return pynvml.nvmlSystemGetDriverVersion(), [
            pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def cuda_build_and_driver() -> str:
    """torch's CUDA build and the NVIDIA driver found here, in a few words: what to compare when
    torch cannot use a GPU (a CUDA 13 build needs a driver of the 580 series or later)."""
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    driver, gpus = nvidia_gpus()
    found = (f"NVIDIA driver {driver} with {len(gpus)} GPU(s) ({', '.join(sorted(set(gpus)))})" if gpus
             else "no GPU reported by nvidia-smi or NVML")
    return f"torch {torch.__version__} is {build}; {found}"

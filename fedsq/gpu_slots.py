"""GPU slots: jobs started side by side on one machine spread over its GPUs.

Snakemake's local scheduler counts GPU jobs (the profile's ``gpu`` resource) but does not say
which GPU a job may use, so every job would train on the first one. Here a job takes a *slot*,
one of ``slots_per_gpu`` per visible GPU, before CUDA starts, and holds it for its life.

A slot is an exclusive ``flock`` on a file in the lock directory. The kernel drops it when the
process ends, however it ends (kill -9 included), so a dead job never keeps a slot; a process
*forked* from the job shares the lock until it ends too (the MLflow helper is started with exec
and does not). The job then sees only its GPU: CUDA_VISIBLE_DEVICES is narrowed to it, so
"cuda" is that GPU for everything in the process. That is more robust than using
``cuda:<i>`` with every GPU visible: whatever uses the current device (pinned memory, the CUDA
RNG states a checkpoint saves, a library's ``.cuda()``) lands on the job's GPU, no CUDA context
is opened on the others, and a checkpoint holds one GPU's RNG state, which a run resumed in
another slot restores as its own.

Environment: FEDSQ_SLOTS_PER_GPU (default 1) and FEDSQ_GPU_LOCK_DIR (default
``<temp dir>/fedsq-gpu-slots-<uid>``, one per user and machine, so that pipelines in different
working directories share the GPUs too). Both describe the machine, not the experiment, hence
no config key: as a run-config key, a change would alter every run's fingerprint and MLflow
params; passed by the workflow (a param or the shell command), Snakemake would rerun every job.
Inside a SLURM allocation the locks are in its sub-folder ``slurm-job-<SLURM_JOB_ID>``: SLURM
numbers each allocation's GPUs from 0, so two allocations on one node must not share locks,
while the jobs of one allocation must.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

SLOTS_ENV = "FEDSQ_SLOTS_PER_GPU"
LOCK_DIR_ENV = "FEDSQ_GPU_LOCK_DIR"


class Slot(NamedTuple):
    device: str  # an entry of CUDA_VISIBLE_DEVICES: an index or a GPU/MIG UUID
    index: int  # which of the device's slots


def slots_per_gpu() -> int:
    """$FEDSQ_SLOTS_PER_GPU: how many jobs share one GPU (several for models that leave it mostly idle)."""
    value = os.environ.get(SLOTS_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{SLOTS_ENV}={value!r}: must be a whole number of jobs per GPU, 1 or more")
    return int(value)


def lock_dir() -> Path:
    """$FEDSQ_GPU_LOCK_DIR, else a folder of this user's under the system temp dir; inside a SLURM
    allocation, its sub-folder of that allocation."""
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"fedsq-gpu-slots-{os.getuid()}")
    job = os.environ.get("SLURM_JOB_ID")
    return folder / f"slurm-job-{job}" if job else folder


def visible_devices() -> list[str]:
    """The GPUs a job may use: the entries of CUDA_VISIBLE_DEVICES, else every GPU torch counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch

    # Before CUDA starts, torch counts through NVML and leaves CUDA_VISIBLE_DEVICES free to change.
    return [str(i) for i in range(torch.cuda.device_count())]


def _try_lock(path: Path) -> int | None:
    """A descriptor holding an exclusive flock on ``path``, or None when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for people asking who holds a GPU
    return fd


def _take(paths: dict[str, list[Path]]) -> tuple[Slot, int] | None:
    """A free slot on the GPU with the most free slots (ties: the first listed), or None.

    Every slot is tried at once and the spare ones released, so that a GPU whose first slot
    came free while its second is busy is not preferred over an idle one.
    """
    free = {device: [(i, fd) for i, path in enumerate(slots) if (fd := _try_lock(path)) is not None]
            for device, slots in paths.items()}
    device = max(free, key=lambda d: len(free[d]))
    if not free[device]:
        return None
    index, kept = free[device][0]
    for got in free.values():
        for _, fd in got:
            if fd != kept:
                os.close(fd)
    return Slot(device, index), kept


@contextlib.contextmanager
def hold(devices: list[str], per_gpu: int, folder: Path, poll_s: float = 1.0) -> Iterator[Slot]:
    """Hold a free slot among ``devices`` x ``per_gpu`` for the block; while none is free, wait
    (saying so on stderr) and try again every ``poll_s`` seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {d: [folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', d)}.slot{i}.lock" for i in range(per_gpu)] for d in devices}
    started, said = time.monotonic(), False
    while (taken := _take(paths)) is None:
        if not said:
            print(f"fedsq: all {len(devices) * per_gpu} GPU slots ({len(devices)} GPUs x {per_gpu}) are taken; "
                  f"waiting for one (locks in {folder})", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)
    slot, fd = taken
    waited = f" after waiting {time.monotonic() - started:.0f} s" if said else ""
    print(f"fedsq: GPU {slot.device}, slot {slot.index}{waited}", file=sys.stderr, flush=True)
    try:
        yield slot
    finally:
        os.close(fd)


@contextlib.contextmanager
def for_job(device: str) -> Iterator[str | None]:
    """The slot a job whose run config says ``device`` (auto | cpu | cuda) needs, held for the
    block, with CUDA_VISIBLE_DEVICES narrowed to its GPU; yields that GPU (None: no slot taken).

    No slot on the CPU or without GPUs. Under SLURM, a slot only where the allocation shows
    several GPUs (``salloc``, then a local profile): a job or step shown one GPU was given that GPU
    by SLURM alone, and steps of one allocation each number theirs 0, so their locks would collide.
    Must run before anything in the process starts CUDA.
    """
    devices = [] if device == "cpu" else visible_devices()
    if not devices or ("SLURM_JOB_ID" in os.environ and len(devices) == 1):
        yield None
        return
    with hold(devices, slots_per_gpu(), lock_dir()) as slot:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.device
        import torch

        if torch.cuda.device_count() > 1:
            raise RuntimeError("CUDA started before the GPU slot was taken, so CUDA_VISIBLE_DEVICES could not "
                               "narrow it to one GPU; take the slot first (fedsq.gpu_slots.for_job)")
        yield slot.device

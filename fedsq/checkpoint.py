"""Atomic run checkpoints: everything needed to continue a run bit for bit.

No random generator state: nothing a run draws depends on where the global generators stand
between rounds. Client sampling and data order come from generators seeded by (seed, round,
client), and each client reseeds torch (every device) before it trains (``engine.train_client``).

A checkpoint is a ``RunState`` saved as one ``torch.save`` file of a plain dict, written to a
temporary name, flushed to disk and renamed over the old one (``files.write_atomic``), so a kill
at any moment leaves either the previous or the new checkpoint, never half of one. It is loaded
with ``weights_only=True``: only tensors and plain Python values, no pickled code (hence the
plain dict on disk, not the dataclass). One made from other inputs than a run's is set aside
under another name, not deleted, so that it can still be looked at.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from fedsq.files import write_atomic


@dataclass
class RunState:
    """A run after its round ``round`` (0: the initial model, evaluated)."""

    round: int
    global_state: dict  # the global model's state_dict
    strategy: dict  # Strategy.state_dict()
    metrics: list[dict]  # metrics.csv's rows so far
    samples_trained: int
    wall_seconds: float
    fingerprint: dict  # what the run's trajectory depends on (engine._fingerprint)
    mlflow_run_id: str | None = None
    correct_at_best: dict | None = None  # {"val": "0110...", "test": ...}: per-image correctness at the best round


def snapshot(value, copy: bool = True):
    """``value`` with its tensors on the CPU. With ``copy`` (the default) later in-place updates
    (optimizer state, control variates) cannot reach it: what a background thread may save
    while training goes on."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=copy)
    if isinstance(value, dict):
        return {k: snapshot(v, copy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v, copy) for v in value)
    return value


def save(path: Path, state: RunState) -> None:
    """Write ``state`` (tensors on any device) atomically to ``path``."""
    # vars, not dataclasses.asdict, which would deep-copy every tensor; no copy to the CPU either:
    # the engine hands over its own snapshot.
    plain = snapshot(vars(state), copy=False)
    write_atomic(path, lambda tmp: torch.save(plain, tmp))


def load(path: Path) -> RunState | None:
    """The checkpoint at ``path``, or None when there is none (a leftover .tmp is ignored).

    A file of another shape (an older fedsq) loads with what it has, its fingerprint empty if it
    had none, so that the run sets it aside rather than resumes it."""
    path = Path(path)
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    fields = {field.name: saved.get(field.name) for field in dataclasses.fields(RunState)}
    return RunState(**fields | {"fingerprint": saved.get("fingerprint") or {}})


def set_aside(path: Path) -> Path:
    """Rename the checkpoint at ``path`` to ``<name>.stale-<UTC time>.pt`` beside it; return the new path."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stale = path.with_name(f"{path.stem}.stale-{stamp}{path.suffix}")
    os.replace(path, stale)
    return stale

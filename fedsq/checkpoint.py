"""Atomic run checkpoints: everything needed to continue a run bit for bit.

A checkpoint is one ``torch.save`` file written to a temporary name, flushed to disk and
renamed over the old one, so a kill at any moment leaves either the previous or the new
checkpoint, never half of one. It is loaded with ``weights_only=True``: only tensors and
plain Python values, no pickled code. One made from other inputs than a run's is set aside
under another name, not deleted, so that it can still be looked at.
"""

from __future__ import annotations

import os
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """The state of every global random generator a run draws from."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save(path: Path, state: dict) -> None:
    """Write ``state`` (tensors on any device, plain values) atomically to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(snapshot(state, copy=False), f)  # the engine hands over its own snapshot
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none (a leftover .tmp is ignored)."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def set_aside(path: Path) -> Path:
    """Rename the checkpoint at ``path`` to ``<name>.stale-<UTC time>.pt`` beside it; return the new path."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stale = path.with_name(f"{path.stem}.stale-{stamp}{path.suffix}")
    os.replace(path, stale)
    return stale

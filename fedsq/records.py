"""Run records: what a finished run leaves behind for others to check, regenerate from and reuse.

A run's record is its ``summary.json`` and ``metrics.csv`` plus the resolved run config as
``config.yaml`` (no checkpoint); a calibration's is its JSON. The evidence grid commits its
records to the repository, so that its README section can be regenerated anywhere and a grid
longer than one sitting continues on another machine instead of starting again.

A record is reused only where its *key* equals the one the run would have: everything that
determines the numbers — the run config's values that differ from the schema's defaults, less
what only names or places the run (tags, paths, MLflow), the learning rate as resolved, the
SHA-256 of every file it reads, the engine's ``NUMERICS`` version and torch's version — and
nothing that changes with every commit or with a new config key. A change to the code, or to a
default, that changes a run's numbers must bump ``NUMERICS`` (``tests/test_records.py`` holds a
run's numbers to committed ones, so such a change cannot go unnoticed).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import torch
import yaml

from fedsq import config
from fedsq.files import write_atomic

# Bump when a change to fedsq alters what a run computes (its metrics), so that records made
# by the old code are recomputed, not reused. 2: channels-last Q on CPU for grouped convolutions.
NUMERICS = 2

# Run config keys that name or place a run, or say where it logs, and the lr as written
# ("calibrated", or a number; the key has it resolved): they change no number.
_NOT_NUMERICS = ("tags.", "paths.", "tracking.", "calibration", "optimizer.lr")
FILES = ("metrics.csv", "summary.json")  # summary.json last: its presence marks a finished record


def key(fingerprint: dict) -> dict:
    """The record key of a run (or calibration) whose fingerprint is ``fingerprint``: the
    fingerprint less the code's commit and the config keys in ``_NOT_NUMERICS``, plus
    ``NUMERICS`` and torch's version."""
    kept = {k: v for k, v in fingerprint.items() if k not in ("code version", "calibration file sha256")}
    defaults = _defaults()
    kept["config"] = {k: v for k, v in config.flatten(fingerprint["config"]).items()
                      if not k.startswith(_NOT_NUMERICS) and (k not in defaults or v != defaults[k])}
    return json.loads(json.dumps(kept | {"numerics": NUMERICS, "torch": torch.__version__.split("+")[0]}))


@functools.cache
def _defaults() -> dict:
    """The run config schema's defaults, flattened (every key has one)."""
    return config.flatten(config.load({}))


def find(candidates: list[Path], record_key: dict) -> Path | None:
    """The first of ``candidates`` (run folders, or calibration JSON files) holding a finished
    record with ``record_key``; None if none does."""
    for candidate in map(Path, candidates):
        summary = candidate / "summary.json" if candidate.suffix != ".json" else candidate
        if summary.is_file() and json.loads(summary.read_text()).get("record_key") == record_key:
            return candidate
    return None


def save_run(run_dir: Path, record_dir: Path) -> None:
    """Copy a finished run's record from ``run_dir`` into ``record_dir`` (created)."""
    record_dir = Path(record_dir)
    if Path(run_dir).resolve() == record_dir.resolve():
        return
    record_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(run_dir) / "summary.json").read_text())["config"]
    write_atomic(record_dir / "config.yaml", lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)))
    for name in FILES:
        write_atomic(record_dir / name, lambda p, name=name: shutil.copyfile(Path(run_dir) / name, p))


def restored_summary(record_dir: Path, run_dir: Path, summary_updates: dict) -> dict:
    """Copy a record's metrics.csv into ``run_dir`` and return its summary with this run's own
    names and places (``summary_updates``: config, tags, ...) and where it came from; the caller
    writes summary.json (last) once MLflow has the run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "metrics.csv", lambda p: shutil.copyfile(Path(record_dir) / "metrics.csv", p))
    summary = json.loads((Path(record_dir) / "summary.json").read_text())
    return copy.deepcopy(summary) | summary_updates | {"reused_from": str(record_dir)}

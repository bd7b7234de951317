"""The code a run executes: for MLflow's tags and for a checkpoint's fingerprint.

A module of its own, apart from ``tracking``, so that the training thread can ask without
importing MLflow (seconds of imports, done on the run's writer thread).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import fedsq


def code_version() -> str:
    """fedsq's version plus the git commit it runs from (-dirty for uncommitted edits), if any."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return fedsq.__version__
    return f"{fedsq.__version__}+{commit}"

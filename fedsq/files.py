"""Atomic file writes: a killed job leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)

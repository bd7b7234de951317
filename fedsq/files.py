"""Atomic file writes: a killed job leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, flush it to disk, then rename it
    over ``path``; return ``path``. If ``write`` raises (a download that fails verification),
    the temporary file is removed and ``path`` is left as it was.

    The fsync makes the rename publish complete contents even after a power cut, not only after
    a killed process. Writers that might append a suffix to a path (``np.save``) should open the
    path themselves and write to the file object.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

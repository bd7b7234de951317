"""Verified downloads: stream to a temporary name, check the digest, then rename.

A file at its final path has therefore always passed verification; a failed or interrupted
download leaves nothing behind that a rerun could mistake for a good file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

CHUNK = 1 << 20


class DigestMismatch(ValueError):
    """A file's digest differs from the expected one."""

    def __init__(self, path: Path, algorithm: str, expected: str, actual: str, hint: str = ""):
        self.path, self.algorithm, self.expected, self.actual = Path(path), algorithm, expected, actual
        message = f"{algorithm} mismatch for {path}: expected {expected}, got {actual}"
        super().__init__(f"{message}; {hint}" if hint else message)


def _hashers(sha256: str | None, md5: str | None) -> dict[str, tuple[str, "hashlib._Hash"]]:
    expected = {"sha256": sha256, "md5": md5}
    return {name: (digest.lower(), hashlib.new(name)) for name, digest in expected.items() if digest}


def _file_digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def sha256_of(path: Path) -> str:
    return _file_digest(path, "sha256")


def md5_of(path: Path) -> str:
    return _file_digest(path, "md5")


def fetch(url: str, dest: Path, *, sha256: str | None = None, md5: str | None = None, desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there; return ``dest``.

    At least one of ``sha256`` / ``md5`` is required. Raises DigestMismatch (naming the file and
    both digests) when the downloaded bytes do not match; the partial file is removed.
    """
    hashers = _hashers(sha256, md5)
    if not hashers:
        raise ValueError(f"refusing an unverified download of {url}: give sha256 or md5")
    dest = Path(dest)
    if dest.exists() and all(_file_digest(dest, name) == want for name, (want, _) in hashers.items()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc or dest.name) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    for _, hasher in hashers.values():
                        hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise ConnectionError(f"download of {url} stopped after {received} of {total} bytes; rerun to retry")
        for name, (want, hasher) in hashers.items():
            if hasher.hexdigest() != want:
                raise DigestMismatch(dest, name, want, hasher.hexdigest())
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest

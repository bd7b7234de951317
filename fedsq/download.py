"""Verified downloads: stream to a temporary name, check size and digest, then rename.

A file at its final path has therefore always passed verification; a failed or interrupted
download leaves nothing behind that a rerun could mistake for a good file. ``fetch_first`` tries
a file's URLs in turn, for hosts that move.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from fedsq.files import write_atomic

CHUNK = 1 << 20


class DigestMismatch(ValueError):
    """A file's digest differs from the expected one."""

    def __init__(self, path: Path, algorithm: str, expected: str, actual: str, hint: str = ""):
        self.path, self.algorithm, self.expected, self.actual = Path(path), algorithm, expected, actual
        message = f"{algorithm} mismatch for {path}: expected {expected}, got {actual}"
        super().__init__(f"{message}; {hint}" if hint else message)


class SizeMismatch(ValueError):
    """A file's size differs from the expected one (checked before the digest: a host that moved
    often answers with an HTML page, which needs no hashing to be told apart)."""

    def __init__(self, path: Path, expected: int, actual: int):
        self.path, self.expected, self.actual = Path(path), expected, actual
        super().__init__(f"size mismatch for {path}: expected {expected:,} bytes, got {actual:,}")


class NoSourceServed(OSError):
    """None of a file's URLs served it verified; the message says why, URL by URL."""


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


def _verified(dest: Path, size: int | None, hashers: dict) -> bool:
    """Whether ``dest`` exists with the expected size and digests (never without a digest)."""
    return (bool(hashers) and dest.exists() and (size is None or dest.stat().st_size == size)
            and all(_file_digest(dest, name) == want for name, (want, _) in hashers.items()))


def fetch(url: str, dest: Path, *, sha256: str | None = None, md5: str | None = None, size: int | None = None,
          desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there; return ``dest``.

    At least one of ``sha256`` / ``md5`` is required; ``size`` (bytes), when given, is checked
    first, against the announced length before any byte is read and against what arrived. Raises
    SizeMismatch or DigestMismatch (naming the file, expected and actual) when the file does not
    match; the partial file is removed.
    """
    hashers = _hashers(sha256, md5)
    if not hashers:
        raise ValueError(f"refusing an unverified download of {url}: give sha256 or md5")
    dest = Path(dest)
    if _verified(dest, size, hashers):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    def download_verified(tmp: Path) -> None:  # raising leaves no file behind (write_atomic)
        with urllib.request.urlopen(url) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            if size is not None and total is not None and total != size:
                raise SizeMismatch(dest, size, total)
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
        if size is not None and received != size:
            raise SizeMismatch(dest, size, received)
        for name, (want, hasher) in hashers.items():
            if hasher.hexdigest() != want:
                raise DigestMismatch(dest, name, want, hasher.hexdigest())

    return write_atomic(dest, download_verified)


def fetch_first(urls: list[str], dest: Path, *, sha256: str | None = None, md5: str | None = None,
                size: int | None = None, desc: str | None = None) -> str | None:
    """``fetch`` from each of ``urls`` in turn until one serves the verified file; return that URL
    (None when a verified copy was already at ``dest``) and say on stderr which URL served it.

    A URL that fails (unreachable, an HTTP error, a cut transfer, a wrong size or digest) is
    reported and the next one tried; when all fail, NoSourceServed lists each URL's failure.
    """
    dest = Path(dest)
    if _verified(dest, size, _hashers(sha256, md5)):
        return None
    failures = []
    for url in urls:
        try:
            fetch(url, dest, sha256=sha256, md5=md5, size=size, desc=desc)
        except (OSError, SizeMismatch, DigestMismatch) as err:
            failures.append(f"{url}: {err}")
            print(f"{dest.name}: {failures[-1]}", file=sys.stderr, flush=True)
            continue
        print(f"{dest.name}: served by {url}", file=sys.stderr, flush=True)
        return url
    raise NoSourceServed(f"no URL served a verified {dest}:\n  " + "\n  ".join(failures))

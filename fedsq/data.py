"""Datasets prepared once into compact arrays, and the batch transform that feeds them to a model.

``prepare(name, root)`` writes ``root/<name>/``: ``{train,val,test}_x.npy`` (uint8, N x H x W x C),
``{train,val,test}_y.npy`` (int64) and ``meta.json``, written last so that its presence marks a
complete folder. ``load`` memory-maps the images, so many processes share one copy in the page
cache. Resizing and normalisation happen per batch on the training device (``to_model_input``),
never per image in Python.

Sources:
  digits    scikit-learn's bundled 8x8 handwritten digits (offline); test and validation carved out
            (stratified, seeded).
  cifar100  torchvision's CIFAR-100 archive, MD5-verified; validation carved from train.
  cinic10   the official CINIC-10 tarball (PNG folders train/valid/test) from Edinburgh DataShare,
            size- and MD5-verified.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedsq import download
from fedsq.files import write_atomic

SPLITS = ("train", "val", "test")

# Share of digits held out for testing (digits ships without a test split).
DIGITS_TEST_FRACTION = 0.2

# Tried in order. DataShare moved to newer repository software: its current address first, the
# old handle URL (dataset 10283/3192) as a fallback.
CINIC10_URLS = (
    "https://datashare.ed.ac.uk/server/api/core/bitstreams/e8e186cc-2688-48f1-aa5a-3fda1a43f8b6/content",
    "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz",
)
# The archive's size and MD5, as public CINIC-10 loaders check them.
CINIC10_SIZE = 687_544_992
CINIC10_MD5 = "6ee4d0c996905fe93221de577967a372"
CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CINIC-10 folder name -> our split name.
CINIC10_SPLITS = {"train": "train", "valid": "val", "test": "test"}


class Split(NamedTuple):
    x: np.ndarray  # uint8, N x H x W x C
    y: np.ndarray  # int64, N


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


class _Built(NamedTuple):
    splits: dict[str, Split]
    classes: list[str]
    source: str
    digest: str


def _carve(split: Split, fraction: float, seed: int, what: str) -> tuple[Split, Split]:
    """Stratified, seeded hold-out: returns (rest, carved), each in original order."""
    from sklearn.model_selection import train_test_split

    num_classes = len(np.unique(split.y))
    carved_size = math.ceil(fraction * len(split.y))
    if carved_size < num_classes:
        raise ValueError(
            f"{what}={fraction} carves {carved_size} of {len(split.y)} samples, fewer than the "
            f"{num_classes} classes a stratified split needs"
        )
    rest, carved = train_test_split(
        np.arange(len(split.y)), test_size=fraction, stratify=split.y, random_state=seed
    )
    return tuple(Split(split.x[np.sort(i)], split.y[np.sort(i)]) for i in (rest, carved))


def _build_digits(downloads: Path, *, val_fraction: float, seed: int, url: str | None, md5: str | None) -> _Built:
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 grey levels; stretch to the usual 0..255.
    x = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    train, test = _carve(Split(x, y), DIGITS_TEST_FRACTION, seed, "digits test fraction")
    train, val = _carve(train, val_fraction, seed, "val_fraction")
    return _Built(
        {"train": train, "val": val, "test": test},
        [str(c) for c in digits.target_names],
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
        digest="sha256:" + hashlib.sha256(digits.images.tobytes() + digits.target.tobytes()).hexdigest(),
    )


def _build_cifar100(downloads: Path, *, val_fraction: float, seed: int, url: str | None, md5: str | None) -> _Built:
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import extract_archive

    class VerifiedCIFAR100(CIFAR100):
        # The archive digest was checked by download.fetch; torchvision's per-file MD5s hold only
        # for the official archive and would reject a mirror whose archive MD5 was overridden.
        train_list = [[name, None] for name, _ in CIFAR100.train_list]
        test_list = [[name, None] for name, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

    url, md5 = url or CIFAR100.url, md5 or CIFAR100.tgz_md5
    archive = download.fetch(url, downloads / CIFAR100.filename, md5=md5, desc="CIFAR-100")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        extract_archive(str(archive), tmp)
        train, test = (VerifiedCIFAR100(tmp, train=is_train) for is_train in (True, False))
        train_split, test_split = (Split(d.data, np.asarray(d.targets, dtype=np.int64)) for d in (train, test))
    train_split, val_split = _carve(train_split, val_fraction, seed, "val_fraction")
    return _Built(
        {"train": train_split, "val": val_split, "test": test_split}, list(train.classes), url, f"md5:{md5}"
    )


def _read_cinic10(archive: Path) -> dict[str, Split]:
    """Decode every PNG of the tarball straight from the compressed stream (no 270k files on disk)."""
    from PIL import Image

    found: dict[str, list[tuple[str, int, np.ndarray]]] = {split: [] for split in CINIC10_SPLITS}
    with (
        tqdm.wrapattr(open(archive, "rb"), "read", total=archive.stat().st_size, desc="converting CINIC-10") as raw,
        tarfile.open(fileobj=raw, mode="r|gz") as tar,
    ):
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not (member.isfile() and member.name.endswith(".png") and len(parts) >= 3 and parts[-3] in found):
                continue  # README, csv files, folders
            folder, class_name = parts[-3], parts[-2]
            if class_name not in CINIC10_CLASSES:
                raise ValueError(f"unexpected class folder {member.name!r} in {archive}; classes are {CINIC10_CLASSES}")
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                # A few CINIC-10 images (from ImageNet) are greyscale.
                pixels = np.asarray(image.convert("RGB"))
            found[folder].append((member.name, CINIC10_CLASSES.index(class_name), pixels))
    splits = {}
    for folder, items in found.items():
        if not items:
            raise ValueError(f"no PNG images under {folder}/ in {archive}; is it the CINIC-10 tarball?")
        items.sort(key=lambda item: item[0])  # archive order is arbitrary; path order is not
        splits[CINIC10_SPLITS[folder]] = Split(
            np.stack([pixels for _, _, pixels in items]), np.array([label for _, label, _ in items], dtype=np.int64)
        )
    return splits


def _build_cinic10(downloads: Path, *, val_fraction: float, seed: int, url: str | None, md5: str | None) -> _Built:
    archive = downloads / "CINIC-10.tar.gz"
    # Another archive (an overridden MD5) has another size.
    served = download.fetch_first([url] if url else list(CINIC10_URLS), archive, md5=md5 or CINIC10_MD5,
                                  size=None if md5 else CINIC10_SIZE, desc="CINIC-10")
    source = served or f"{archive} (verified, from an earlier download)"
    return _Built(_read_cinic10(archive), list(CINIC10_CLASSES), source, f"md5:{md5 or CINIC10_MD5}")


class _Source(NamedTuple):
    build: Callable[..., _Built]
    carves_val: bool  # validation carved from train by (val_fraction, seed), else the dataset's own
    downloads: bool


SOURCES = {
    "digits": _Source(_build_digits, carves_val=True, downloads=False),
    "cifar100": _Source(_build_cifar100, carves_val=True, downloads=True),
    "cinic10": _Source(_build_cinic10, carves_val=False, downloads=True),
}


def _source(name: str) -> _Source:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(SOURCES)}")
    return SOURCES[name]


def _npy_writer(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npy" to the temp name
            np.save(f, array)

    return write


def prepare(
    name: str,
    root: Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    url: str | None = None,
    md5: str | None = None,
) -> Path:
    """Prepare dataset ``name`` into ``root/<name>/`` (reused if already prepared the same way)."""
    source = _source(name)
    if not source.downloads and (url or md5):
        raise ValueError(f"{name} ships with scikit-learn; url and md5 do not apply")
    if source.carves_val and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(root) / name
    meta_path = out / "meta.json"
    recipe = {"val_fraction": val_fraction, "seed": seed} if source.carves_val else {}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("recipe") == recipe:
        return out
    meta_path.unlink(missing_ok=True)  # incomplete until meta.json is written again
    downloads = out / "download"
    (downloads if source.downloads else out).mkdir(parents=True, exist_ok=True)
    built = source.build(downloads, val_fraction=val_fraction, seed=seed, url=url, md5=md5)
    # Readers may have the old files memory-mapped: new files are renamed over them.
    for split_name, split in built.splits.items():
        write_atomic(out / f"{split_name}_x.npy", _npy_writer(split.x))
        write_atomic(out / f"{split_name}_y.npy", _npy_writer(split.y))
    meta = {
        "name": name,
        "num_classes": len(built.classes),
        "classes": built.classes,
        "image_shape": list(built.splits["train"].x.shape[1:]),
        "sizes": {s: len(built.splits[s].y) for s in SPLITS},
        "source": built.source,
        "digest": built.digest,
        "recipe": recipe,
    }
    write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return out


def load(name: str, root: Path) -> Dataset:
    """A prepared dataset; images memory-mapped (read-only), labels in memory."""
    _source(name)
    folder = Path(root) / name
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"dataset {name} is not prepared in {folder}; run `fedsq data prepare {name} --root {root}`"
        )
    meta = json.loads(meta_path.read_text())
    splits = {s: Split(np.load(folder / f"{s}_x.npy", mmap_mode="r"), np.load(folder / f"{s}_y.npy")) for s in SPLITS}
    return Dataset(name, tuple(meta["classes"]), **splits)


def to_model_input(
    x: torch.Tensor, image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """uint8 N x H x W x C batch -> float N x 3 x S x S normalised by the backbone's ``mean`` and ``std``
    (``models.SPECS``), computed on x's device."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected a uint8 N x H x W x C batch with C in (1, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = x.expand(-1, 3, -1, -1)  # greyscale -> RGB (no copy; the normalisation below makes one)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t

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

Your own data, prepared the same way into ``root/<name>/`` (``dataset_name``: the folder's name,
or the file's without ``.npz``) and prepared afresh every time (the files may have changed):
  imagefolder:<folder>  torchvision's ImageFolder layout: ``train/<class>/<image>``, optional
                        ``val/`` and ``test/`` alike (their class folders among train's); images
                        converted to RGB; mixed sizes all resized to ``image_size``.
  npz:<file>            arrays ``x_train`` (uint8, N x H x W or N x H x W x C with C 1 or 3) and
                        ``y_train`` (integer labels 0..K-1), optional ``x_val, y_val, x_test, y_test``.
  A missing test split is carved out of train as digits' is, then a missing validation split.
"""

from __future__ import annotations

import hashlib
import io
import json
import functools
import math
import os
import re
import tarfile
import tempfile
import warnings
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

# Share held out for testing from a dataset that ships without a test split (digits, your own).
TEST_FRACTION = 0.2

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


def _carve_missing(splits: dict[str, Split], val_fraction: float, seed: int) -> dict[str, Split]:
    """Test, then validation, carved out of train where the dataset has none of its own."""
    splits = dict(splits)
    if "test" not in splits:
        splits["train"], splits["test"] = _carve(splits["train"], TEST_FRACTION, seed, "test fraction")
    if "val" not in splits:
        splits["train"], splits["val"] = _carve(splits["train"], val_fraction, seed, "val_fraction")
    return splits


def _build_digits(downloads: Path, *, val_fraction: float, seed: int, url: str | None, md5: str | None,
                  image_size: int) -> _Built:
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 grey levels; stretch to the usual 0..255.
    x = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    return _Built(
        _carve_missing({"train": Split(x, y)}, val_fraction, seed),
        [str(c) for c in digits.target_names],
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
        digest="sha256:" + hashlib.sha256(digits.images.tobytes() + digits.target.tobytes()).hexdigest(),
    )


def _build_cifar100(downloads: Path, *, val_fraction: float, seed: int, url: str | None, md5: str | None,
                    image_size: int) -> _Built:
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


def _build_cinic10(downloads: Path, *, val_fraction: float, seed: int, url: str | None, md5: str | None,
                   image_size: int) -> _Built:
    archive = downloads / "CINIC-10.tar.gz"
    # Another archive (an overridden MD5) has another size.
    served = download.fetch_first([url] if url else list(CINIC10_URLS), archive, md5=md5 or CINIC10_MD5,
                                  size=None if md5 else CINIC10_SIZE, desc="CINIC-10")
    source = served or f"{archive} (verified, from an earlier download)"
    return _Built(_read_cinic10(archive), list(CINIC10_CLASSES), source, f"md5:{md5 or CINIC10_MD5}")


def _resized(images: list[np.ndarray], image_size: int, where: str) -> list[np.ndarray]:
    """The images as they are when all share one size, else all resized (as the engine resizes
    batches: bilinear, antialiased) to ``image_size`` square, said once."""
    sizes = sorted({image.shape[:2] for image in images})
    if len(sizes) == 1:
        return images
    warnings.warn(f"{where}: images come in {len(sizes)} sizes ({sizes[0]} to {sizes[-1]}, H x W); "
                  f"all resized to {image_size} x {image_size} (image_size)", stacklevel=3)
    resized = []
    for image in images:  # one at a time: each has its own size
        x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        resized.append(x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    return resized


def _read_image_folder(root: Path, image_size: int) -> tuple[dict[str, Split], list[str], str]:
    """(splits found, classes, content digest) of an ImageFolder-layout folder."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not (root / "train").is_dir():
        raise ValueError(f"{root}: no train/ folder; expected train/<class>/<images>, optionally val/ and test/ alike")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root / 'train'}: {len(classes)} class folder(s) {classes}; a classifier needs at least two")
    items: dict[str, list[tuple[Path, int]]] = {}
    for split in (s for s in SPLITS if (root / s).is_dir()):
        folders = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        if set(folders) - set(classes):
            raise ValueError(f"{root / split}: class folders {sorted(set(folders) - set(classes))} are not in train/")
        items[split] = []
        for name in folders:  # labelled by train's class order, whichever classes this split has
            files = sorted(p for p in (root / split / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise ValueError(f"{root / split / name}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} files)")
            items[split] += [(path, classes.index(name)) for path in files]
    digest, pixels, unreadable = hashlib.sha256(), {}, []
    for path, _ in (item for split_items in items.values() for item in split_items):
        content = path.read_bytes()
        digest.update(str(path.relative_to(root)).encode() + b"\0" + content)
        try:
            with Image.open(io.BytesIO(content)) as image:
                pixels[path] = np.asarray(image.convert("RGB"))
        except OSError:  # PIL's UnidentifiedImageError and truncated files
            unreadable.append(str(path))
    if unreadable:
        raise ValueError(f"{len(unreadable)} unreadable image(s) in {root}: {', '.join(unreadable[:5])}"
                         + (" ..." if len(unreadable) > 5 else ""))
    images = dict(zip(pixels, _resized(list(pixels.values()), image_size, str(root))))
    splits = {
        split: Split(np.stack([images[path] for path, _ in found]), np.array([label for _, label in found], dtype=np.int64))
        for split, found in items.items()
    }
    return splits, classes, f"sha256:{digest.hexdigest()}"


def _read_npz(path: Path, image_size: int) -> tuple[dict[str, Split], list[str], str]:
    """(splits found, classes "0".."K-1", file digest) of an npz file of arrays."""
    with np.load(path) as arrays:
        given = {split for split in SPLITS if f"x_{split}" in arrays.files or f"y_{split}" in arrays.files}
        missing = [key for split in given | {"train"} for key in (f"x_{split}", f"y_{split}") if key not in arrays.files]
        if missing:
            raise ValueError(f"{path}: no array {', '.join(missing)} (it holds {', '.join(arrays.files)})")
        splits = {split: Split(arrays[f"x_{split}"], arrays[f"y_{split}"]) for split in given}
    for split, (x, y) in splits.items():
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise ValueError(f"{path}: x_{split} must be uint8 N x H x W or N x H x W x C (C 1 or 3), "
                             f"got {x.dtype} {x.shape}")
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),) or y.min() < 0:
            raise ValueError(f"{path}: y_{split} must be {len(x)} integer labels from 0, got {y.dtype} {y.shape}")
        splits[split] = Split(x if x.ndim == 4 else x[..., None], y.astype(np.int64))
    counts = np.bincount(splits["train"].y, minlength=max(int(y.max()) for _, y in splits.values()) + 1)
    if len(counts) < 2 or not counts.all():
        raise ValueError(f"{path}: y_train must hold every label from 0 to the largest (at least 2 classes); "
                         f"training images per label: {counts.tolist()}")
    if len({x.shape[1:3] for x, _ in splits.values()}) > 1:
        splits = {split: Split(np.stack(_resized(list(x), image_size, str(path))), y) for split, (x, y) in splits.items()}
    return splits, [str(label) for label in range(len(counts))], f"sha256:{download.sha256_of(path)}"


def _build_own(read: Callable, path: Path, downloads: Path, *, val_fraction: float, seed: int, url: str | None,
               md5: str | None, image_size: int) -> _Built:
    splits, classes, digest = read(path, image_size)
    return _Built(_carve_missing(splits, val_fraction, seed), classes, os.path.abspath(path), digest)


class _Source(NamedTuple):
    build: Callable[..., _Built]  # image_size: the side images of mixed sizes are resized to (your own data)
    carves: bool  # validation (and test where missing) carved from train by (val_fraction, seed)
    downloads: bool
    own: bool = False  # your files: prepared afresh every time, since they may have changed


SOURCES = {
    "digits": _Source(_build_digits, carves=True, downloads=False),
    "cifar100": _Source(_build_cifar100, carves=True, downloads=True),
    "cinic10": _Source(_build_cinic10, carves=False, downloads=True),
}
OWN_READERS = {"imagefolder": _read_image_folder, "npz": _read_npz}
NAME_FORMS = (*SOURCES, "imagefolder:<folder>", "npz:<file>")


def _own(dataset: str) -> tuple[str, Path] | None:
    """(kind, path) of ``imagefolder:<folder>`` or ``npz:<file>``; None for any other name."""
    kind, sep, path = dataset.partition(":")
    return (kind, Path(path)) if sep and kind in OWN_READERS and path else None


def dataset_name(dataset: str) -> str:
    """The folder ``dataset`` is prepared into under the data root, also its name in the pipeline's
    result paths: a built-in's own name, or your folder's name (your file's, less ``.npz``)."""
    own = _own(dataset)
    if own is None:
        _source(dataset)
        return dataset
    kind, path = own
    absolute = Path(os.path.abspath(path))  # "." and a trailing "/" named; symbolic links not followed
    name = absolute.stem if kind == "npz" else absolute.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"dataset {dataset!r}: its name {name!r} is not a safe folder name (letters, digits, _ . -)")
    if name in SOURCES:
        raise ValueError(f"dataset {dataset!r} would be prepared over the built-in {name}; rename {path}")
    return name


def _source(dataset: str) -> _Source:
    own = _own(dataset)
    if own is not None:
        kind, path = own
        return _Source(functools.partial(_build_own, OWN_READERS[kind], path), carves=True, downloads=False, own=True)
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(NAME_FORMS)}")
    return SOURCES[dataset]


def _npy_writer(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npy" to the temp name
            np.save(f, array)

    return write


def prepare(
    dataset: str,
    root: Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    url: str | None = None,
    md5: str | None = None,
    image_size: int = 32,
) -> Path:
    """Prepare ``dataset`` into ``root/<dataset_name(dataset)>/``: a built-in is reused if already
    prepared the same way; your own data is prepared afresh. ``image_size``: the side your
    images are resized to where they come in mixed sizes (the run config's default)."""
    source = _source(dataset)
    if not source.downloads and (url or md5):
        raise ValueError(f"{dataset} is not downloaded; url and md5 do not apply")
    if source.carves and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(root) / dataset_name(dataset)
    meta_path = out / "meta.json"
    recipe = {"val_fraction": val_fraction, "seed": seed} if source.carves else {}
    if not source.own and meta_path.exists() and json.loads(meta_path.read_text()).get("recipe") == recipe:
        return out
    meta_path.unlink(missing_ok=True)  # incomplete until meta.json is written again
    downloads = out / "download"
    (downloads if source.downloads else out).mkdir(parents=True, exist_ok=True)
    built = source.build(downloads, val_fraction=val_fraction, seed=seed, url=url, md5=md5, image_size=image_size)
    # Readers may have the old files memory-mapped: new files are renamed over them.
    for split_name, split in built.splits.items():
        write_atomic(out / f"{split_name}_x.npy", _npy_writer(split.x))
        write_atomic(out / f"{split_name}_y.npy", _npy_writer(split.y))
    meta = {
        "name": out.name,
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


def load(dataset: str, root: Path) -> Dataset:
    """A prepared dataset; images memory-mapped (read-only), labels in memory."""
    folder = Path(root) / dataset_name(dataset)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"dataset {dataset} is not prepared in {folder}; run `fedsq data prepare {dataset} --root {root}`"
        )
    meta = json.loads(meta_path.read_text())
    splits = {s: Split(np.load(folder / f"{s}_x.npy", mmap_mode="r"), np.load(folder / f"{s}_y.npy")) for s in SPLITS}
    return Dataset(dataset, tuple(meta["classes"]), **splits)


def channel_constants(values: tuple[float, float, float], device: torch.device | str) -> torch.Tensor:
    """Per-channel ``values`` (a backbone's mean or std) as a float 1 x 3 x 1 x 1 tensor on ``device``."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def to_model_input(x: torch.Tensor, image_size: int, mean: tuple[float, float, float] | torch.Tensor,
                   std: tuple[float, float, float] | torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x C batch -> float N x 3 x S x S normalised by the backbone's ``mean`` and ``std``
    (the backbone's record in ``models``), computed on x's device. Called per batch, pass them as
    ``channel_constants`` on that device: made from tuples here they are a blocking host-to-device
    copy at every call."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected a uint8 N x H x W x C batch with C in (1, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = x.expand(-1, 3, -1, -1)  # greyscale -> RGB (no copy; the normalisation below makes one)
    if not isinstance(mean, torch.Tensor):
        mean, std = channel_constants(mean, x.device), channel_constants(std, x.device)
    return (x - mean) / std

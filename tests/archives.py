"""Test helpers: tiny archives in the real dataset formats, and a loopback HTTP server for them."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import pickle
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image

CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Archive(NamedTuple):
    path: Path
    md5: str
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 N x 32 x 32 x 3, int labels)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def cifar100_tarball(path: Path, per_class: dict[str, int], seed: int = 0) -> Archive:
    """cifar-100-python.tar.gz as published: pickled dicts train / test / meta, images flattened CHW."""
    rng = np.random.default_rng(seed)
    classes = [f"class{i:02d}" for i in range(100)]
    splits = {}
    with tarfile.open(path, "w:gz") as tar:
        for split, count in per_class.items():
            labels = rng.permutation(np.repeat(np.arange(100), count))
            images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
            batch = {
                "batch_label": f"tiny {split} batch",
                "filenames": [f"{split}_{i}.png" for i in range(len(labels))],
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
            }
            _add_bytes(tar, f"cifar-100-python/{split}", pickle.dumps(batch))
            splits[split] = (images, labels)
        meta = {"fine_label_names": classes, "coarse_label_names": [f"super{i:02d}" for i in range(20)]}
        _add_bytes(tar, "cifar-100-python/meta", pickle.dumps(meta))
    return Archive(path, _md5(path), classes, splits)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def cinic10_tarball(path: Path, per_class: dict[str, int], seed: int = 0) -> Archive:
    """CINIC-10.tar.gz layout: {train,valid,test}/<class>/<name>.png plus loose metadata files.

    The first image of each folder is greyscale, as some of CINIC-10's ImageNet images are; its
    expected RGB form repeats the grey level.
    """
    rng = np.random.default_rng(seed)
    splits = {}
    with tarfile.open(path, "w:gz") as tar:
        _add_bytes(tar, "README.md", b"tiny CINIC-10 stand-in\n")
        for split, count in per_class.items():
            images, labels = [], []
            for label, name in enumerate(CINIC10_CLASSES):
                for i in range(count):
                    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    if i == 0:
                        rgb[:] = rgb[..., :1]
                    _add_bytes(tar, f"{split}/{name}/cinic-{i:04d}.png", _png(rgb[..., 0] if i == 0 else rgb))
                    images.append(rgb)
                    labels.append(label)
            splits[split] = (np.stack(images), np.array(labels))
    return Archive(path, _md5(path), list(CINIC10_CLASSES), splits)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder; with ``cut_after`` it promises the whole file but sends only that many bytes."""

    def __init__(self, *args, cut_after: int | None = None, **kwargs):
        self.cut_after = cut_after  # set before super().__init__, which handles the request
        super().__init__(*args, **kwargs)

    def copyfile(self, source, outputfile):
        if self.cut_after is None:
            super().copyfile(source, outputfile)
        else:
            outputfile.write(source.read(self.cut_after))

    def log_message(self, format, *args):
        pass  # keep test output readable


@contextlib.contextmanager
def serve(directory: Path, cut_after: int | None = None) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) for the block; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory), cut_after=cut_after)
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
            thread.join()

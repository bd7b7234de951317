import hashlib

import pytest

from fedsq import download
from tests.archives import serve

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: several read chunks
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


@pytest.fixture
def served(tmp_path):
    """(folder served on 127.0.0.1 holding blob.bin, its base URL, an empty destination folder)."""
    folder = tmp_path / "server"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(PAYLOAD)
    with serve(folder) as url:
        yield folder, url, tmp_path / "dest"


def leftovers(dest_folder):
    return sorted(p.name for p in dest_folder.iterdir()) if dest_folder.exists() else []


@pytest.mark.parametrize("digests", [{"sha256": SHA256}, {"md5": MD5}, {"sha256": SHA256, "md5": MD5.upper()}])
def test_fetch_downloads_and_verifies(served, digests):
    _, url, dest_folder = served
    path = download.fetch(f"{url}/blob.bin", dest_folder / "blob.bin", **digests)
    assert path == dest_folder / "blob.bin" and path.read_bytes() == PAYLOAD
    assert download.sha256_of(path) == SHA256 and download.md5_of(path) == MD5
    assert leftovers(dest_folder) == ["blob.bin"]


def test_verified_file_is_reused_without_a_download(served):
    folder, url, dest_folder = served
    first = download.fetch(f"{url}/blob.bin", dest_folder / "blob.bin", sha256=SHA256)
    (folder / "blob.bin").unlink()  # a second download would now fail with 404
    assert download.fetch(f"{url}/blob.bin", first, sha256=SHA256) == first


def test_a_stale_file_with_the_wrong_digest_is_replaced(served):
    _, url, dest_folder = served
    dest_folder.mkdir()
    (dest_folder / "blob.bin").write_bytes(b"old version")
    download.fetch(f"{url}/blob.bin", dest_folder / "blob.bin", sha256=SHA256)
    assert (dest_folder / "blob.bin").read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 3], lambda b: b[:1000] + bytes([b[1000] ^ 0xFF]) + b[1001:]],
    ids=["truncated", "corrupted"],
)
def test_bad_archive_raises_naming_file_and_digests_and_leaves_nothing(served, damage):
    folder, url, dest_folder = served
    (folder / "blob.bin").write_bytes(damage(PAYLOAD))
    actual = hashlib.sha256(damage(PAYLOAD)).hexdigest()
    with pytest.raises(download.DigestMismatch) as caught:
        download.fetch(f"{url}/blob.bin", dest_folder / "blob.bin", sha256=SHA256)
    message = str(caught.value)
    assert str(dest_folder / "blob.bin") in message and SHA256 in message and actual in message
    assert (caught.value.expected, caught.value.actual) == (SHA256, actual)
    assert isinstance(caught.value, ValueError)
    assert leftovers(dest_folder) == []

    # Once the server has the right file, a rerun succeeds.
    (folder / "blob.bin").write_bytes(PAYLOAD)
    assert download.fetch(f"{url}/blob.bin", dest_folder / "blob.bin", sha256=SHA256).read_bytes() == PAYLOAD


def test_interrupted_transfer_leaves_nothing(tmp_path):
    (tmp_path / "blob.bin").write_bytes(PAYLOAD)
    with serve(tmp_path, cut_after=len(PAYLOAD) // 2) as url, pytest.raises(
        ConnectionError, match=f"stopped after {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes"
    ):
        download.fetch(f"{url}/blob.bin", tmp_path / "dest" / "blob.bin", sha256=SHA256)
    assert leftovers(tmp_path / "dest") == []


def test_unverified_download_is_refused(served):
    _, url, dest_folder = served
    with pytest.raises(ValueError, match="refusing an unverified download"):
        download.fetch(f"{url}/blob.bin", dest_folder / "blob.bin")
    assert leftovers(dest_folder) == []


def test_a_wrong_size_is_an_error_naming_file_and_both_sizes(served):
    _, url, dest_folder = served
    with pytest.raises(download.SizeMismatch) as caught:
        download.fetch(f"{url}/blob.bin", dest_folder / "blob.bin", sha256=SHA256, size=len(PAYLOAD) + 1)
    assert str(caught.value) == (f"size mismatch for {dest_folder / 'blob.bin'}: "
                                 f"expected {len(PAYLOAD) + 1:,} bytes, got {len(PAYLOAD):,}")
    assert leftovers(dest_folder) == []


def test_fetch_first_falls_back_past_a_404_and_a_wrong_size_and_says_which_url_served(served, capsys):
    folder, url, dest_folder = served
    (folder / "moved.html").write_bytes(b"<html>this dataset has moved</html>")
    urls = [f"{url}/gone.bin", f"{url}/moved.html", f"{url}/blob.bin"]
    served_by = download.fetch_first(urls, dest_folder / "blob.bin", md5=MD5, size=len(PAYLOAD))
    assert served_by == urls[2] and (dest_folder / "blob.bin").read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert f"{urls[0]}: HTTP Error 404" in err and f"{urls[1]}: size mismatch" in err
    assert f"blob.bin: served by {urls[2]}" in err
    # A verified copy is used as it is: no URL is asked.
    assert download.fetch_first([f"{url}/gone.bin"], dest_folder / "blob.bin", md5=MD5, size=len(PAYLOAD)) is None


def test_fetch_first_names_every_failure_when_no_url_serves(served):
    folder, url, dest_folder = served
    (folder / "other.bin").write_bytes(PAYLOAD[::-1])  # right size, wrong digest
    urls = [f"{url}/gone.bin", f"{url}/other.bin"]
    with pytest.raises(download.NoSourceServed) as caught:
        download.fetch_first(urls, dest_folder / "blob.bin", md5=MD5, size=len(PAYLOAD))
    message = str(caught.value)
    assert f"no URL served a verified {dest_folder / 'blob.bin'}" in message
    assert f"{urls[0]}: HTTP Error 404" in message and f"{urls[1]}: md5 mismatch" in message and MD5 in message
    assert isinstance(caught.value, OSError) and leftovers(dest_folder) == []

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedsq import data, download
from tests import archives
from tests.archives import serve


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root, val_fraction=0.1, seed=0)
    return root


def test_digits_shapes_dtypes_and_sizes(digits_root):
    ds = data.load("digits", digits_root)
    assert ds.name == "digits" and ds.num_classes == 10 and ds.classes == tuple("0123456789")
    assert ds.image_shape == (8, 8, 1)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == np.uint8 and split.x.shape[1:] == (8, 8, 1)
        assert split.y.dtype == np.int64 and len(split.y) == len(split.x)
    assert isinstance(ds.train.x, np.memmap)
    sizes = [len(s.y) for s in (ds.train, ds.val, ds.test)]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(1797 * data.TEST_FRACTION, abs=1)
    assert sizes[1] == pytest.approx((1797 - sizes[2]) * 0.1, abs=1)


def test_digits_pixels_are_rescaled_and_all_images_kept_once(digits_root):
    ds = data.load("digits", digits_root)
    x = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
    assert x.min() == 0 and x.max() == 255
    # Every original image appears exactly once across the three splits.
    original = load_digits()
    expected = np.round(original.images * 255 / 16).astype(np.uint8)[..., None]
    as_rows = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert as_rows(x) == as_rows(expected)


def test_digits_carve_outs_are_stratified(digits_root):
    ds = data.load("digits", digits_root)
    overall = np.bincount(load_digits().target) / 1797
    for split in (ds.train, ds.val, ds.test):
        np.testing.assert_allclose(np.bincount(split.y, minlength=10) / len(split.y), overall, atol=0.01)


def test_meta_records_the_source(digits_root):
    meta = json.loads((digits_root / "digits" / "meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["image_shape"] == [8, 8, 1]
    assert meta["sizes"]["train"] + meta["sizes"]["val"] + meta["sizes"]["test"] == 1797
    assert meta["source"].startswith("sklearn.datasets.load_digits")
    assert meta["digest"].startswith("sha256:") and meta["recipe"] == {"val_fraction": 0.1, "seed": 0}


def test_prepare_is_idempotent_and_redoes_on_a_new_recipe(tmp_path):
    folder = data.prepare("digits", tmp_path, seed=0)
    stamp = (folder / "train_x.npy").stat().st_mtime_ns
    first_val = np.load(folder / "val_y.npy")
    assert data.prepare("digits", tmp_path, seed=0) == folder
    assert (folder / "train_x.npy").stat().st_mtime_ns == stamp  # reused, not rewritten

    data.prepare("digits", tmp_path, seed=1)
    assert json.loads((folder / "meta.json").read_text())["recipe"]["seed"] == 1
    assert not np.array_equal(np.load(folder / "val_y.npy"), first_val)


def test_incomplete_folder_is_not_loaded(tmp_path):
    folder = data.prepare("digits", tmp_path)
    (folder / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="fedsq data prepare digits"):
        data.load("digits", tmp_path)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda root: data.prepare("mnist", root), "unknown dataset 'mnist'; allowed: digits, cifar100, cinic10, imagefolder:<folder>, npz:<file>"),
        (lambda root: data.load("mnist", root), "unknown dataset 'mnist'"),
        (lambda root: data.prepare("digits", root, val_fraction=1.5), r"val_fraction must be in \(0, 1\), got 1.5"),
        (lambda root: data.prepare("digits", root, val_fraction=0.001), "val_fraction=0.001 carves 2 of 1437"),
        (lambda root: data.prepare("digits", root, md5="00"), "digits is not downloaded; url and md5 do not apply"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


def test_to_model_input_normalises_and_repeats_grey_channels():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 4, 4, 1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = data.to_model_input(x, 4, mean, std)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    mean, std = torch.tensor(mean), torch.tensor(std)
    torch.testing.assert_close(out[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(out[1, :, 0, 0], (1 - mean) / std)


def test_to_model_input_keeps_rgb_order_and_skips_resize_at_native_size():
    x = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    out = data.to_model_input(x, 8, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(out, x.permute(0, 3, 1, 2).float() / 255)


def test_to_model_input_resizes_whole_batch_bilinearly():
    # A horizontal ramp stays a ramp after upsampling: monotone along width, constant along height.
    ramp = torch.linspace(0, 255, 8).round().to(torch.uint8)
    x = ramp.view(1, 1, 8, 1).expand(5, 8, 8, 1)
    out = data.to_model_input(x, 32, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (5, 3, 32, 32)
    assert torch.all(out[..., 1:] >= out[..., :-1] - 1e-6)
    torch.testing.assert_close(out, out[:, :, :1, :].expand_as(out))
    assert out.min() >= 0 and out.max() <= 1


def test_to_model_input_rejects_non_uint8_or_channels_first():
    with pytest.raises(ValueError, match="expected a uint8 N x H x W x C batch"):
        data.to_model_input(torch.zeros(2, 8, 8, 3), 8, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(2, 3, 8, 8\)"):
        data.to_model_input(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8, (0, 0, 0), (1, 1, 1))


def same_images(prepared: data.Split, images: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the prepared split holds exactly these (image, label) pairs, in any order."""
    key = lambda x, y: sorted(zip(map(bytes, x.reshape(len(x), -1)), y.tolist()))  # noqa: E731
    return key(np.asarray(prepared.x), prepared.y) == key(images, labels)


@pytest.fixture
def mirror(tmp_path):
    """A folder served on 127.0.0.1 (a stand-in for the dataset hosts) and its base URL."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    with serve(folder) as url:
        yield folder, url


def test_cifar100_downloads_verifies_and_converts(mirror, tmp_path):
    folder, url = mirror
    tiny = archives.cifar100_tarball(folder / "cifar-100-python.tar.gz", {"train": 5, "test": 2})
    root = tmp_path / "data"
    out = data.prepare("cifar100", root, val_fraction=0.2, seed=3, url=f"{url}/cifar-100-python.tar.gz", md5=tiny.md5)

    ds = data.load("cifar100", root)
    assert ds.classes == tuple(tiny.classes) and ds.image_shape == (32, 32, 3)
    assert [len(s.y) for s in (ds.train, ds.val, ds.test)] == [400, 100, 200]
    assert np.array_equal(np.bincount(ds.val.y), np.ones(100))  # stratified: one per class
    train_x, train_y = tiny.splits["train"]
    assert same_images(data.Split(np.concatenate([ds.train.x, ds.val.x]), np.concatenate([ds.train.y, ds.val.y])),
                       train_x, train_y)
    assert same_images(ds.test, *tiny.splits["test"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["digest"] == f"md5:{tiny.md5}" and meta["source"].endswith("/cifar-100-python.tar.gz")
    # The verified archive is kept for reruns; the extracted pickles are not.
    assert sorted(p.name for p in (out / "download").iterdir()) == ["cifar-100-python.tar.gz"]


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:-10] + bytes(10)], ids=["truncated", "corrupted"])
def test_cifar100_bad_archive_fails_cleanly_and_a_rerun_recovers(mirror, tmp_path, damage):
    folder, url = mirror
    good = archives.cifar100_tarball(tmp_path / "good.tar.gz", {"train": 2, "test": 1})
    served = folder / "cifar-100-python.tar.gz"
    served.write_bytes(damage(good.path.read_bytes()))
    root = tmp_path / "data"
    args = dict(val_fraction=0.5, url=f"{url}/cifar-100-python.tar.gz", md5=good.md5)
    with pytest.raises(download.DigestMismatch) as caught:
        data.prepare("cifar100", root, **args)
    assert str(root / "cifar100" / "download" / "cifar-100-python.tar.gz") in str(caught.value)
    assert good.md5 in str(caught.value) and download.md5_of(served) in str(caught.value)
    # Nothing a rerun could take for a good archive or a prepared dataset.
    assert list((root / "cifar100" / "download").iterdir()) == []
    assert not (root / "cifar100" / "meta.json").exists()

    served.write_bytes(good.path.read_bytes())
    data.prepare("cifar100", root, **args)
    assert len(data.load("cifar100", root).test.y) == 100


def test_cinic10_downloads_verifies_and_converts_png_folders(mirror, tmp_path):
    folder, url = mirror
    tiny = archives.cinic10_tarball(folder / "CINIC-10.tar.gz", {"train": 3, "valid": 2, "test": 2})
    root = tmp_path / "data"
    data.prepare("cinic10", root, url=f"{url}/CINIC-10.tar.gz", md5=tiny.md5)

    ds = data.load("cinic10", root)
    assert ds.classes == data.CINIC10_CLASSES == tuple(archives.CINIC10_CLASSES)
    assert ds.image_shape == (32, 32, 3) and ds.train.x.dtype == np.uint8 and ds.train.y.dtype == np.int64
    # CINIC-10's own valid folder is the validation split; greyscale PNGs come out as grey RGB.
    for split, folder_name in [(ds.train, "train"), (ds.val, "valid"), (ds.test, "test")]:
        assert same_images(split, *tiny.splits[folder_name])
    assert json.loads((root / "cinic10" / "meta.json").read_text())["recipe"] == {}


def test_cinic10_tries_its_urls_in_order_and_records_the_one_that_served(mirror, tmp_path, monkeypatch, capsys):
    folder, url = mirror
    tiny = archives.cinic10_tarball(folder / "CINIC-10.tar.gz", {"train": 1, "valid": 1, "test": 1})
    archives.cinic10_tarball(folder / "other.tar.gz", {"train": 2, "valid": 1, "test": 1})  # another size
    urls = (f"{url}/moved", f"{url}/other.tar.gz", f"{url}/CINIC-10.tar.gz")
    monkeypatch.setattr(data, "CINIC10_URLS", urls)
    monkeypatch.setattr(data, "CINIC10_SIZE", tiny.path.stat().st_size)
    monkeypatch.setattr(data, "CINIC10_MD5", tiny.md5)
    out = data.prepare("cinic10", tmp_path)
    assert json.loads((out / "meta.json").read_text())["source"] == urls[2]
    err = capsys.readouterr().err
    assert "HTTP Error 404" in err and "size mismatch" in err and f"CINIC-10.tar.gz: served by {urls[2]}" in err


def test_cinic10_with_another_digest_fails_naming_file_and_digests(mirror, tmp_path, monkeypatch):
    folder, url = mirror
    tiny = archives.cinic10_tarball(folder / "CINIC-10.tar.gz", {"train": 1, "valid": 1, "test": 1})
    monkeypatch.setattr(data, "CINIC10_URLS", (f"{url}/CINIC-10.tar.gz",))
    monkeypatch.setattr(data, "CINIC10_SIZE", tiny.path.stat().st_size)  # the built-in MD5 expected
    with pytest.raises(download.NoSourceServed) as caught:
        data.prepare("cinic10", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "cinic10" / "download" / "CINIC-10.tar.gz") in message
    assert data.CINIC10_MD5 in message and tiny.md5 in message
    assert list((tmp_path / "cinic10" / "download").iterdir()) == []


def image_folder(root, classes=("cat", "dog", "owl"), per_class=12, size=(10, 10), splits=("train",)):
    """A tiny ImageFolder-layout folder of PNGs: each class its own colour, each image its own shade."""
    from PIL import Image

    for split in splits:
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixel = (80 * label, 20 * i % 256, 255 - 80 * label)
                Image.new("RGB", size, pixel).save(root / split / name / f"{i:02d}.png")
    return root


def test_imagefolder_is_prepared_like_a_built_in_with_missing_splits_carved(tmp_path):
    folder = image_folder(tmp_path / "pets")
    out = data.prepare(f"imagefolder:{folder}", tmp_path / "data", val_fraction=0.1, seed=0)
    assert out == tmp_path / "data" / "pets" and data.dataset_name(f"imagefolder:{folder}/") == "pets"

    ds = data.load(f"imagefolder:{folder}", tmp_path / "data")
    assert ds.classes == ("cat", "dog", "owl") and ds.image_shape == (10, 10, 3) and ds.train.x.dtype == np.uint8
    assert [len(s.y) for s in (ds.train, ds.val, ds.test)] == [25, 3, 8]  # test 20 % of 36, then val 10 % of 28
    assert np.array_equal(np.bincount(ds.val.y), [1, 1, 1])  # stratified
    assert all(np.all(s.x[..., 0] == 80 * s.y[:, None, None]) for s in (ds.train, ds.val, ds.test))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "pets" and meta["source"] == str(folder) and meta["digest"].startswith("sha256:")
    assert meta["recipe"] == {"val_fraction": 0.1, "seed": 0}


def test_imagefolder_keeps_its_own_splits_and_resizes_mixed_sizes_once(tmp_path):
    folder = image_folder(tmp_path / "pets", per_class=2, splits=("train", "val", "test"))
    from PIL import Image

    Image.new("RGB", (14, 9)).save(folder / "train" / "cat" / "wide.png")
    with pytest.warns(UserWarning, match=r"images come in 2 sizes .*; all resized to 16 x 16 \(image_size\)") as caught:
        data.prepare(f"imagefolder:{folder}", tmp_path, image_size=16)
    assert len(caught) == 1
    ds = data.load(f"imagefolder:{folder}", tmp_path)
    assert [len(s.y) for s in (ds.train, ds.val, ds.test)] == [7, 6, 6] and ds.image_shape == (16, 16, 3)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "train" / "owl" / "00.png").write_bytes(b"not a png"), r"1 unreadable image\(s\) in .*owl/00.png"),
        (lambda f: [p.unlink() for p in (f / "train" / "owl").iterdir()], r"train/owl: empty class folder"),
        (lambda f: [shutil.rmtree(f / "train" / c) for c in ("dog", "owl")], r"train: 1 class folder\(s\) \['cat'\]; a classifier needs at least two"),
        (lambda f: (f / "test" / "emu").mkdir(parents=True), r"test: class folders \['emu'\] are not in train/"),
        (lambda f: shutil.rmtree(f / "train"), "no train/ folder"),
    ],
    ids=["unreadable", "empty-class", "one-class", "unknown-class", "no-train"],
)
def test_imagefolder_problems_are_clear_errors_naming_the_file(tmp_path, damage, message):
    folder = image_folder(tmp_path / "pets", per_class=2)
    damage(folder)
    with pytest.raises(ValueError, match=message):
        data.prepare(f"imagefolder:{folder}", tmp_path / "data")


def test_npz_arrays_are_prepared_like_a_built_in(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8), np.arange(40) % 4
    np.savez(tmp_path / "blobs.npz", x_train=x, y_train=y, x_test=x[:8, ..., None], y_test=y[:8])  # N x H x W, N x H x W x C
    data.prepare(f"npz:{tmp_path / 'blobs.npz'}", tmp_path / "data", val_fraction=0.2)
    ds = data.load(f"npz:{tmp_path / 'blobs.npz'}", tmp_path / "data")
    assert ds.classes == ("0", "1", "2", "3") and ds.image_shape == (6, 6, 1)
    assert [len(s.y) for s in (ds.train, ds.val, ds.test)] == [32, 8, 8]  # its own test split; val carved
    assert same_images(data.Split(np.concatenate([ds.train.x, ds.val.x]), np.concatenate([ds.train.y, ds.val.y])), x[..., None], y)
    assert same_images(ds.test, x[:8, ..., None], y[:8])


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x_train=np.zeros((4, 5, 5), np.uint8)), r"no array y_train \(it holds x_train\)"),
        (dict(x_train=np.zeros((4, 5, 5)), y_train=np.arange(4) % 2), "x_train must be uint8"),
        (dict(x_train=np.zeros((4, 5, 5), np.uint8), y_train=np.zeros(4, int)), r"at least 2 classes.*\[4\]"),
        (dict(x_train=np.zeros((4, 5, 5), np.uint8), y_train=np.array([0, 0, 2, 2])), r"per label: \[2, 0, 2\]"),
        (dict(x_train=np.zeros((4, 5, 5), np.uint8), y_train=np.arange(4) % 2, x_val=np.zeros((1, 5, 5), np.uint8)), "no array y_val"),
    ],
    ids=["no-labels", "float-images", "one-class", "label-gap", "val-without-labels"],
)
def test_npz_problems_are_clear_errors_naming_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as caught:
        data.prepare(f"npz:{tmp_path / 'bad.npz'}", tmp_path / "data")
    assert str(tmp_path / "bad.npz") in str(caught.value)


def test_own_dataset_names_must_be_safe_and_not_a_built_in(tmp_path):
    with pytest.raises(ValueError, match="would be prepared over the built-in digits"):
        data.dataset_name(f"imagefolder:{tmp_path / 'digits'}")
    with pytest.raises(ValueError, match="'my pets' is not a safe folder name"):
        data.dataset_name(f"imagefolder:{tmp_path / 'my pets'}")

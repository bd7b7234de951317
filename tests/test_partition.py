import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedsq import partition

# 10 classes of unequal size (40..85 samples), shuffled: like a real training set.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), np.arange(40, 90, 5)))

SPLITS = {
    "iid": lambda labels, seed: partition.iid(labels, 8, seed),
    "dirichlet": lambda labels, seed: partition.dirichlet(labels, 8, 0.5, seed),
    "shards": lambda labels, seed: partition.shards(labels, 8, 2, seed),
}


def class_fractions(parts, labels):
    counts = partition.class_counts(parts, labels, 10).to_numpy()
    return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("scheme", SPLITS)
def test_disjoint_cover_of_all_indices(scheme):
    parts = SPLITS[scheme](LABELS, 0)
    assert len(parts) == 8
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    together = np.concatenate(parts)
    assert len(together) == len(LABELS)
    np.testing.assert_array_equal(np.sort(together), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", SPLITS)
def test_same_seed_same_split_other_seed_other_split(scheme):
    first, again, other = (SPLITS[scheme](LABELS, seed) for seed in (7, 7, 8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_no_global_rng_use():
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    partition.dirichlet(LABELS, 8, 0.5, seed=1)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition.iid(LABELS, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_large_alpha_is_close_to_class_balanced():
    parts = partition.dirichlet(LABELS, 5, alpha=1e6, seed=0)
    overall = np.bincount(LABELS) / len(LABELS)
    np.testing.assert_allclose(class_fractions(parts, LABELS), np.tile(overall, (5, 1)), atol=0.02)


def test_small_alpha_is_skewed():
    parts = partition.dirichlet(LABELS, 5, alpha=0.05, seed=0, min_size=1)
    fractions = class_fractions(parts, LABELS)
    # Each client is dominated by few classes, far from the ~0.1 share of a balanced split.
    assert np.median(fractions.max(axis=1)) > 0.5


def test_min_size_is_honoured():
    # The first draw leaves some client too small, so this exercises the redraw.
    with pytest.raises(ValueError, match="failed 1 draws"):
        partition.dirichlet(LABELS, 20, alpha=0.1, seed=0, min_size=10, max_tries=1)
    parts = partition.dirichlet(LABELS, 20, alpha=0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10


def test_unreachable_min_size_names_alpha_clients_and_min_size():
    with pytest.raises(ValueError, match=r"alpha=0.01, num_clients=50, min_size=5 failed 3 draws"):
        partition.dirichlet(LABELS, 50, alpha=0.01, seed=0, min_size=5, max_tries=3)


def test_impossible_min_size_fails_before_drawing():
    with pytest.raises(ValueError, match="min_size=100 for num_clients=10 needs 1000 samples"):
        partition.dirichlet(LABELS, 10, alpha=1.0, seed=0, min_size=100)


@pytest.mark.parametrize("alpha", [0, -0.5])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=f"alpha must be > 0, got {alpha}$"):
        partition.dirichlet(LABELS, 4, alpha, seed=0)


@pytest.mark.parametrize("make", [SPLITS["iid"], SPLITS["dirichlet"], SPLITS["shards"]])
def test_more_clients_than_samples_is_an_error(make):
    with pytest.raises(ValueError, match="num_clients=8 is more than the 5 samples"):
        make(LABELS[:5], 0)


@pytest.mark.parametrize("num_clients, classes_per_client", [(8, 2), (10, 1), (7, 3), (3, 10)])
def test_shards_give_exactly_the_requested_classes(num_clients, classes_per_client):
    parts = partition.shards(LABELS, num_clients, classes_per_client, seed=0)
    assert [len(np.unique(LABELS[p])) for p in parts] == [classes_per_client] * num_clients
    holders = (partition.class_counts(parts, LABELS, 10).to_numpy() > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1  # classes spread evenly over clients


def test_shards_reject_impossible_requests():
    with pytest.raises(ValueError, match=r"classes_per_client must be in \[1, 10\], got 11"):
        partition.shards(LABELS, 10, 11, seed=0)
    with pytest.raises(ValueError, match="num_clients=4 x classes_per_client=2 cannot hold all 10 classes"):
        partition.shards(LABELS, 4, 2, seed=0)


@pytest.mark.parametrize(
    "label, split",
    [
        ("iid", {"scheme": "iid"}),
        ("dir0.5", {"scheme": "dirichlet", "alpha": 0.5}),
        ("dir100", {"scheme": "dirichlet", "alpha": 100.0}),
        ("dir1000000", {"scheme": "dirichlet", "alpha": 1e6}),
        ("shards2", {"scheme": "shards", "classes_per_client": 2}),
    ],
)
def test_split_labels_round_trip(label, split):
    assert partition.parse_split_label(label) == split
    assert partition.split_label({**split, "num_clients": 10, "seed": 3}) == label


@pytest.mark.parametrize("label", ["", "IID", "dir", "dirx", "shards", "shards-1", "dirichlet0.5"])
def test_bad_split_label_names_the_allowed_forms(label):
    with pytest.raises(ValueError, match=r"bad split label .*allowed: 'iid', 'dir<alpha>'"):
        partition.parse_split_label(label)


def test_make_dispatches_and_ignores_unused_keys():
    # A run config's split section carries every key, whatever the scheme.
    common = {"num_clients": 6, "seed": 4, "alpha": 0.3, "min_size": 3, "classes_per_client": 2}
    made = partition.make(LABELS, {**common, "scheme": "dirichlet"})
    direct = partition.dirichlet(LABELS, 6, 0.3, seed=4, min_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(made, direct))
    made = partition.make(LABELS, {**common, "scheme": "shards"})
    assert all(np.array_equal(a, b) for a, b in zip(made, partition.shards(LABELS, 6, 2, seed=4)))
    with pytest.raises(ValueError, match="unknown split scheme 'pathological'; allowed: iid, dirichlet, shards"):
        partition.make(LABELS, {**common, "scheme": "pathological"})


def test_write_and_load_artifacts(tmp_path):
    parts = partition.dirichlet(LABELS, 6, 0.5, seed=0)
    out = partition.write(parts, LABELS, tmp_path / "split", num_classes=10)
    assert sorted(p.name for p in out.iterdir()) == ["class_counts.csv", "heatmap.png", "partition.npz"]

    loaded = partition.load(out)
    assert len(loaded) == 6 and all(np.array_equal(a, b) for a, b in zip(loaded, parts))
    assert all(np.array_equal(a, b) for a, b in zip(partition.load(out / "partition.npz"), parts))

    counts = pd.read_csv(out / "class_counts.csv", index_col="client")
    assert counts.shape == (6, 10) and list(counts.columns) == [str(c) for c in range(10)]
    np.testing.assert_array_equal(counts.to_numpy().sum(axis=0), np.bincount(LABELS))
    np.testing.assert_array_equal(counts.loc[2].to_numpy(), np.bincount(LABELS[parts[2]], minlength=10))

    with Image.open(out / "heatmap.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_heatmap_handles_many_clients_and_classes(tmp_path):
    labels = np.arange(5000) % 100
    parts = partition.iid(labels, 100, seed=0)
    partition.write(parts, labels, tmp_path, num_classes=100)
    with Image.open(tmp_path / "heatmap.png") as image:
        assert image.width <= 12 * 120 and image.height <= 9 * 120


def test_cli_prepares_digits_and_writes_a_partition(tmp_path, capsys):
    from fedsq import cli

    assert cli.main(["data", "prepare", "digits", "--root", str(tmp_path / "data")]) == 0
    out = tmp_path / "split"
    args = ["partition", "--dataset", "digits", "--data-root", str(tmp_path / "data"), "--out", str(out)]
    assert cli.main([*args, "--split", "dir0.5", "--num-clients", "10", "--seed", "1"]) == 0
    parts = partition.load(out)
    assert len(parts) == 10 and sum(map(len, parts)) == 1293
    capsys.readouterr()

    for bad, message in [
        (["--split", "dir0", "--num-clients", "10"], "alpha must be > 0, got 0.0"),
        (["--split", "iid", "--num-clients", "5000"], "num_clients=5000 is more than the 1293 samples"),
        (["--split", "fifty-fifty", "--num-clients", "10"], "bad split label 'fifty-fifty'"),
    ]:
        assert cli.main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert cli.main(["data", "prepare", "mnist"]) == 2
    assert "unknown dataset 'mnist'; allowed: digits, cifar100, cinic10" in capsys.readouterr().err

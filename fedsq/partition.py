"""Client partitions of a labelled training set: i.i.d., Dirichlet label skew, class shards.

Each partitioner is a plain function over a label array that returns one sorted int64 index
array per client; together they cover every sample exactly once. Each draws from its own
``numpy.random.Generator`` seeded from ``seed``, so a split depends on nothing but its arguments.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedsq.files import write_atomic

SPLIT_FORMS = "'iid', 'dir<alpha>' (e.g. dir0.5) or 'shards<classes per client>' (e.g. shards2)"


def _check_num_clients(labels: np.ndarray, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ValueError(f"num_clients={num_clients} is more than the {len(labels)} samples to split")


def _sorted_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(p).astype(np.int64) for p in parts]


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal out: client sizes differ by at most one."""
    labels = np.asarray(labels)
    _check_num_clients(labels, num_clients)
    rng = np.random.default_rng(seed)
    return _sorted_parts(np.array_split(rng.permutation(len(labels)), num_clients))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 2,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is spread over the clients in proportions drawn from Dir(alpha).

    Small alpha gives each client few classes; large alpha approaches a class-balanced split.
    A draw that leaves some client with fewer than ``min_size`` samples is redrawn, at most
    ``max_tries`` times.
    """
    labels = np.asarray(labels)
    _check_num_clients(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(labels):
        raise ValueError(
            f"min_size={min_size} for num_clients={num_clients} needs {min_size * num_clients} samples, "
            f"only {len(labels)} exist"
        )
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for indices in class_indices:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
            for client, chunk in enumerate(np.split(rng.permutation(indices), cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        smallest = min(len(p) for p in merged)
        if smallest >= min_size:
            return _sorted_parts(merged)
    raise ValueError(
        f"dirichlet split with alpha={alpha}, num_clients={num_clients}, min_size={min_size} failed "
        f"{max_tries} draws (smallest client got {smallest} samples); raise alpha or lower num_clients or min_size"
    )


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological split: every client holds exactly ``classes_per_client`` distinct classes.

    Each client in turn takes the classes held by the fewest clients so far (ties broken at
    random), so every class has as many holders as any other, within one; each class's samples
    are shared evenly among its holders.
    """
    labels = np.asarray(labels)
    _check_num_clients(labels, num_clients)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be in [1, {len(classes)}], got {classes_per_client}")
    if num_clients * classes_per_client < len(classes):
        raise ValueError(
            f"shards: num_clients={num_clients} x classes_per_client={classes_per_client} cannot hold "
            f"all {len(classes)} classes"
        )
    rng = np.random.default_rng(seed)
    holders_per_class = np.zeros(len(classes))
    held = np.zeros((num_clients, len(classes)), dtype=bool)
    for client in range(num_clients):
        # Random fractions < 1 only break ties between equally used classes.
        chosen = np.argsort(holders_per_class + rng.random(len(classes)))[:classes_per_client]
        held[client, chosen] = True
        holders_per_class[chosen] += 1
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for column, c in enumerate(classes):
        holders = np.flatnonzero(held[:, column])
        indices = rng.permutation(np.flatnonzero(labels == c))
        if len(indices) < len(holders):
            raise ValueError(
                f"shards: class {c} has {len(indices)} samples for {len(holders)} clients; "
                f"lower num_clients or classes_per_client"
            )
        for client, chunk in zip(holders, np.array_split(indices, len(holders))):
            parts[client].append(chunk)
    return _sorted_parts([np.concatenate(p) for p in parts])


def parse_split_label(label: str) -> dict:
    """'iid' -> {'scheme': 'iid'}; 'dir0.5' -> dirichlet alpha 0.5; 'shards2' -> 2 classes per client."""
    if label == "iid":
        return {"scheme": "iid"}
    if match := re.fullmatch(r"dir(.+)", label):
        try:
            return {"scheme": "dirichlet", "alpha": float(match[1])}
        except ValueError:
            pass
    if match := re.fullmatch(r"shards(\d+)", label):
        return {"scheme": "shards", "classes_per_client": int(match[1])}
    raise ValueError(f"bad split label {label!r}; allowed: {SPLIT_FORMS}")


def split_label(split: dict) -> str:
    """Inverse of parse_split_label (ignores num_clients, seed and other keys)."""
    scheme = split["scheme"]
    if scheme == "iid":
        return "iid"
    if scheme == "dirichlet":
        return "dir" + np.format_float_positional(float(split["alpha"]), trim="-")
    if scheme == "shards":
        return f"shards{split['classes_per_client']}"
    raise ValueError(f"unknown split scheme {scheme!r}; allowed: iid, dirichlet, shards")


def make(labels: np.ndarray, split: dict) -> list[np.ndarray]:
    """Partition by a split dict {scheme, num_clients, seed, alpha?, min_size?, classes_per_client?}.

    Keys the scheme does not use are ignored, so a run config's whole `split` section can be passed.
    """
    scheme, num_clients, seed = split["scheme"], split["num_clients"], split["seed"]
    if scheme == "iid":
        return iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        min_size = split.get("min_size")
        return dirichlet(labels, num_clients, split["alpha"], seed, min_size=2 if min_size is None else min_size)
    if scheme == "shards":
        return shards(labels, num_clients, split["classes_per_client"], seed)
    raise ValueError(f"unknown split scheme {scheme!r}; allowed: iid, dirichlet, shards")


def class_counts(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> pd.DataFrame:
    """Clients x classes table of sample counts."""
    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    return pd.DataFrame(
        counts,
        index=pd.RangeIndex(len(parts), name="client"),
        columns=[str(c) for c in range(num_classes)],
    )


def _heatmap(counts: pd.DataFrame, path: Path) -> None:
    num_clients, num_classes = counts.shape
    fig = Figure(figsize=(min(3 + 0.35 * num_classes, 12), min(2 + 0.3 * num_clients, 9)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(counts.to_numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples")
    # Label every row/column while that stays legible; otherwise let matplotlib pick ticks.
    if num_classes <= 30:
        ax.set_xticks(range(num_classes), counts.columns)
    if num_clients <= 40:
        ax.set_yticks(range(num_clients))
    if num_clients * num_classes <= 400:  # small tables: print the counts in the cells too
        threshold = counts.to_numpy().max() / 2
        for (client, c), n in np.ndenumerate(counts.to_numpy()):
            ax.text(c, client, n, ha="center", va="center", fontsize=7, color="black" if n > threshold else "white")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    total = int(counts.to_numpy().sum())
    ax.set_title(f"samples per client and class ({num_clients} clients, {total} samples)")
    fig.savefig(path, dpi=120, format="png")


def write_counts(counts: pd.DataFrame, out_dir: Path) -> Path:
    """Write class_counts.csv and heatmap.png of a clients x classes table; return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "class_counts.csv", lambda p: counts.to_csv(p))
    write_atomic(out_dir / "heatmap.png", lambda p: _heatmap(counts, p))
    return out_dir


def write(parts: list[np.ndarray], labels: np.ndarray, out_dir: Path, num_classes: int) -> Path:
    """Write partition.npz (client_0, client_1, ...), class_counts.csv and heatmap.png; return out_dir."""
    out_dir = write_counts(class_counts(parts, labels, num_classes), out_dir)

    def save_npz(p: Path) -> None:
        with open(p, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temp name
            np.savez(f, **{f"client_{i}": part for i, part in enumerate(parts)})

    # The indices go last: their presence marks a complete partition.
    write_atomic(out_dir / "partition.npz", save_npz)
    return out_dir


def load(path: Path) -> list[np.ndarray]:
    """Client index arrays from a partition folder or its partition.npz, in client order."""
    path = Path(path)
    if path.is_dir():
        path = path / "partition.npz"
    with np.load(path) as npz:
        return [npz[f"client_{i}"] for i in range(len(npz.files))]

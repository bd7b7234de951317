"""One federated run: sequential client simulation over one model object.

Every sampled client in turn loads the global state into the same model, trains on its
own samples (served by index from the prepared uint8 arrays, converted on the device), and
adds its state to a running sample-weighted sum; the strategy turns the average into the
next global state. Memory is a constant number of models whatever the number of clients;
per-client state (SCAFFOLD, FedBN) lives on disk.

Outputs in the run folder: ``checkpoint.pt`` (every round, atomic; removed once the run is
finished), ``metrics.csv`` (one row per round, round 0 = the initial model) and
``summary.json`` (written last: its presence marks a finished run).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedsq import (checkpoint, config, data, download, environment, models, partition, records, strategies,
                   tracking_uri, version, weights)
from fedsq.background import SerialWorker
from fedsq.files import write_atomic
from fedsq.aggregate import WeightedAverage
from fedsq.batchnorm import BatchNormPolicy
from fedsq.client_store import ClientStore

METRICS_COLUMNS = [
    "round", "val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "gate_agreement",
    "gate_agreement_pretrained_bn", "lr", "samples_trained", "wall_seconds",
]


# Steps between host syncs that look for a NaN/inf loss (a NaN survives in the running sum).
DIVERGENCE_CHECK_EVERY = 8


class Diverged(ValueError):
    """A client's training loss became NaN or infinite."""


def _check_finite(loss_sum: torch.Tensor, round: int, client: int) -> float:
    total = loss_sum.item()
    if not math.isfinite(total):
        raise Diverged(f"round {round}, client {client}: training loss is {total} (diverged); try a smaller optimizer.lr")
    return total


def resolve_device(name: str) -> torch.device:
    """``cuda`` is the job's own GPU: ``fedsq run`` narrowed CUDA_VISIBLE_DEVICES to its slot's (``gpu_slots``).
    A run that asks for it and cannot have it stops here, rather than train on the CPU for days."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: 'cuda' requested but torch cannot use a GPU here: "
                         f"{environment.cuda_build_and_driver()} (device: cpu trains on the CPU)")
    return torch.device(name)


def round_lr(cfg: dict, lr: float, round: int) -> float:
    """The client learning rate of ``round`` (1-based) under ``lr_schedule``."""
    if cfg["lr_schedule"] == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (round - 1) / cfg["rounds"]))
    return lr


def memory_format(model: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """Channels-last on GPUs (tensor cores want it), and on CPUs for networks with depthwise
    (grouped) convolutions, which oneDNN runs faster in it (an EfficientNet-Lite0 training step at
    32 px: 1.2x on an AVX2 host, 2.5x on the host of issue 18's measurement); contiguous for the
    others on CPUs (ResNet-18 at 32 px: 10 % slower in channels-last)."""
    grouped = any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
    return torch.channels_last if device.type == "cuda" or grouped else torch.contiguous_format


def sample_clients(cfg: dict, round: int) -> np.ndarray:
    """The clients of ``round``, from a generator seeded by (run seed, round): a resumed run
    draws the same clients as an uninterrupted one."""
    n, k = cfg["split"]["num_clients"], cfg["clients_per_round"] or cfg["split"]["num_clients"]
    if k == n:
        return np.arange(n)
    return np.sort(np.random.default_rng((cfg["seed"], round)).choice(n, size=k, replace=False))


def deterministic_kernels(cfg: dict) -> None:
    """Run config ``deterministic: true``: CUDA kernels that give the same result every time (two
    GPU runs of one seed, and a resumed run, then agree bit for bit; slower). cuBLAS reads its
    workspace setting when it starts, so this comes before anything runs on the GPU."""
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Simulation:
    """The in-memory side of a run: data on the device, one model, its strategy and BN policy.

    ``work_dir`` holds the per-client stores (SCAFFOLD's control variates, FedBN's layers).
    """

    def __init__(self, cfg: dict, work_dir: Path):
        self.cfg = cfg
        deterministic_kernels(cfg)
        self.device = resolve_device(cfg["device"])
        precision = cfg["precision"]
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        if self.device.type == "cpu":
            # Deterministic kernels, without the NaN fill of every new tensor that comes with them:
            # it only catches kernels that read memory they never wrote, and took a fifth of an
            # evidence round's CPU time (torch.profiler, one thread).
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = False
        seed_everything(cfg["seed"])

        dataset = data.load(cfg["dataset"], Path(cfg["paths"]["data"]))
        self.num_classes = dataset.num_classes
        self.splits = {name: self._to_device(getattr(dataset, name)) for name in ("train", "val", "test")}
        self.partition_dir = Path(cfg["paths"]["partition"]) if cfg["paths"]["partition"] else None
        if self.partition_dir is not None:
            self.parts = partition.load(self.partition_dir)
        else:
            self.parts = partition.make(dataset.train.y, cfg["split"])
        if len(self.parts) != cfg["split"]["num_clients"]:
            raise ValueError(
                f"paths.partition: {self.partition_dir} has {len(self.parts)} clients, "
                f"split.num_clients is {cfg['split']['num_clients']}"
            )
        self.client_sizes = [len(p) for p in self.parts]

        backbone = cfg["backbone"]
        models.check_image_size(backbone, cfg["image_size"])
        record = models.backbone(backbone)
        # Made once on the device: built per batch they were a blocking copy in every step.
        self.mean, self.std = (data.channel_constants(v, self.device) for v in (record.mean, record.std))
        weights_path = weights.resolve(backbone, cfg["weights"], Path(cfg["paths"]["weights"]))
        base = models.build(backbone, self.num_classes, weights_path)
        self.memory_format = memory_format(base, self.device)
        # The pretrained (initial) network whose gates drift is measured against.
        self.reference = copy.deepcopy(base).eval().requires_grad_(False)
        self.reference.to(self.device, memory_format=self.memory_format)
        client_state = Path(work_dir) / "client_state"
        self.client_stores = (ClientStore(client_state / "method"), ClientStore(client_state / "batchnorm"))
        self.strategy = strategies.build(
            cfg["method"], self.client_stores[0], num_clients=cfg["split"]["num_clients"])
        self.model = self.strategy.wrap(base).to(self.device, memory_format=self.memory_format)
        self.strategy.bind(self.model)
        self.bn = BatchNormPolicy(cfg["bn"], self.model, self.client_stores[1])
        self.params = [p for _, p in strategies.trainable(self.model)]
        self.regime_caches = self.cache_regimes()
        self.probe = self.inputs(self.splits["val"][0][: cfg["eval"]["probe_size"]])

    def cache_regimes(self) -> dict:
        """FedSQ's structural regimes of the samples each split is trained or evaluated on
        (``used``), computed once (``dualcopy.RegimeCache``); {} for the other
        methods, or where they are computed live."""
        if not isinstance(self.strategy, strategies.FedSQ):
            return {}
        return self.strategy.regime_caches(self.model, {name: self.used(name)[0] for name in self.splits},
                                           self.inputs, self.cfg["eval"]["batch_size"])

    def used(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (images, labels) of ``split`` that are trained or evaluated, in the order its regime
        cache is indexed: validation's eval.val_size subset (CINIC-10: 10k of 90k), other splits whole."""
        x, y = self.splits[split]
        if split == "val" and self.val_subset is not None:
            return x[self.val_subset], y[self.val_subset]
        return x, y

    def forward(self, split: str, index: torch.Tensor | slice, x: torch.Tensor) -> torch.Tensor:
        """The model on ``x``, the samples ``index`` of ``split``'s ``used`` ones: with their cached
        regimes if there are."""
        cache = self.regime_caches.get(split)
        return self.model(x) if cache is None else self.model(x, cache[index])

    def _to_device(self, split: data.Split) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split moved once (uint8 images: 4x smaller than floats); batches are
        gathered by index and converted on the device. Not through pinned memory: that would
        hold page-locked RAM for the whole job to speed up this one copy."""
        x, y = torch.from_numpy(np.array(split.x)), torch.from_numpy(np.array(split.y))  # read into memory once
        return x.to(self.device), y.to(self.device)

    def inputs(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = data.to_model_input(x_uint8, self.cfg["image_size"], self.mean, self.std)
        return x.contiguous(memory_format=self.memory_format)

    def global_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def train_client(self, client: int, indices: np.ndarray, round: int, lr: float, global_state: dict,
                     epochs: int | None = None) -> tuple[float, int]:
        """Local training of one client from the global state; returns (sum of sample losses, samples)."""
        cfg, model = self.cfg, self.model
        epochs = epochs or cfg["local_epochs"]
        model.load_state_dict(global_state)
        self.bn.client_begin(model, client, round)
        self.strategy.client_begin(model, client, round, global_state)
        opt = torch.optim.SGD(self.params, lr=lr, momentum=cfg["optimizer"]["momentum"],
                              weight_decay=cfg["optimizer"]["weight_decay"])
        self.bn.train_mode(model)
        x_all, y_all = self.splits["train"]
        order_rng = np.random.default_rng((cfg["seed"], round, client))
        # Whatever draws from torch's generator (dropout) draws as this client would alone: its
        # training is the same wherever it runs (in this loop, or on its own Flower SuperNode).
        torch.manual_seed(int(np.random.SeedSequence((cfg["seed"], round, client)).generate_state(1)[0]))
        num_batches = math.ceil(len(indices) / cfg["batch_size"])
        loss_sum, steps = torch.zeros((), device=self.device), 0
        # No step reads a value back to the host but every DIVERGENCE_CHECK_EVERY-th: a GPU runs ahead.
        for epoch in range(epochs):
            self.bn.epoch_begin(last=epoch == epochs - 1)
            order = torch.from_numpy(order_rng.permutation(indices)).to(self.device)  # one copy per epoch
            # Near-equal batches (as np.array_split): never a batch of one, which BatchNorm cannot train on.
            for index in torch.tensor_split(order, num_batches):
                self.bn.step_begin()
                x, y = self.inputs(x_all[index]), y_all[index]
                with torch.autocast(**self.autocast):
                    loss = F.cross_entropy(self.forward("train", index, x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                self.strategy.client_grad(self.params)
                opt.step()
                loss_sum += loss.detach().float() * len(index)
                steps += 1
                if steps % DIVERGENCE_CHECK_EVERY == 0:
                    _check_finite(loss_sum, round, client)
        self.bn.client_end(model, client, round)
        self.strategy.client_end(model, client, round, steps, lr, cfg["optimizer"]["momentum"], global_state)
        return _check_finite(loss_sum, round, client), len(indices) * epochs

    def new_average(self) -> WeightedAverage:
        """The running average of one round's client states, BatchNorm statistics pooled as the policy says."""
        return WeightedAverage(self.bn.pooled_var())

    def train_round(self, round: int, lr: float, global_state: dict,
                    after_client: Callable[[], None] = lambda: None) -> tuple[dict, float, int]:
        """One round over the sampled clients; returns (new global state, mean train loss, samples)."""
        average = self.new_average()
        loss_sum, samples = 0.0, 0
        clients = sample_clients(self.cfg, round)
        for client in tqdm(clients, desc=f"round {round} clients", leave=False, unit="client"):
            client_loss, client_samples = self.train_client(int(client), self.parts[client], round, lr, global_state)
            average.add(self.model.state_dict(), self.client_sizes[client])
            loss_sum, samples = loss_sum + client_loss, samples + client_samples
            after_client()
        return self.strategy.server_update(global_state, average.result()), loss_sum / samples, samples

    @torch.inference_mode()
    def predict(self, split: str, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (correct, cross-entropy) of the model as it is, over the samples of a split
        that are evaluated (``used``), or those ``indices`` of them."""
        self.model.eval()
        x_all, y_all = self.used(split)
        if indices is not None:
            x_all, y_all = x_all[indices], y_all[indices]
        size = self.cfg["eval"]["batch_size"]
        correct, losses = [], []
        for start in range(0, len(y_all), size):
            batch = slice(start, start + size)
            x, y = x_all[batch], y_all[batch]
            with torch.autocast(**self.autocast):
                logits = self.forward(split, batch if indices is None else indices[batch], self.inputs(x)).float()
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            correct.append(logits.argmax(1) == y)
        return torch.cat(correct), torch.cat(losses)

    @functools.cached_property
    def val_subset(self) -> torch.Tensor | None:
        """The validation images evaluated (eval.val_size), None for all: class-stratified and
        drawn with a fixed seed, so every run, method and round selects on the same images."""
        size, labels = self.cfg["eval"]["val_size"], self.splits["val"][1].cpu().numpy()
        if size is None or size >= len(labels):
            return None
        from sklearn.model_selection import train_test_split

        try:
            subset, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=0)
        except ValueError as err:  # fewer images than classes
            raise ValueError(f"eval.val_size: {size} cannot be stratified over the validation split ({err})") from None
        return torch.from_numpy(np.sort(subset)).to(self.device)

    def evaluate(self, split: str) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) on a split; "val" on its eval.val_size subset."""
        return self.evaluate_images(split)[:2]

    def evaluate_images(self, split: str) -> tuple[float, float, str]:
        """``evaluate``'s figures and which images were right, as a string of 0s and 1s in the
        split's order: what a bootstrap over images resamples (``summary.json``'s ``correct_at_best``)."""
        correct, losses = self.predict(split)
        bits = "".join(map(str, correct.to(torch.uint8).tolist()))
        return bits.count("1") / len(bits), losses.double().mean().item(), bits

    def write_partition(self, folder: Path) -> None:
        """The partition made here (its indices and class counts), for the run's MLflow artifacts."""
        partition.write(self.parts, self.splits["train"][1].cpu().numpy(), folder, self.num_classes)

    def client_accuracy(self) -> np.ndarray:
        """Accuracy on each client's own training samples, from one pass over the training set."""
        correct = self.predict("train")[0].cpu().numpy()
        return np.array([correct[part].mean() for part in self.parts])

    def gate_agreement(self) -> tuple[float, float]:
        """Agreement of the model's own gates (a DualCopy's: its quantitative copy's) with the
        pretrained ones: own BN stats, pretrained BN stats."""
        from fedsq import drift

        self.model.eval()
        return tuple(
            drift.gate_agreement(self.model, self.reference, self.probe, reference_bn=reference_bn)
            for reference_bn in (False, True)
        )


def _changed_keys(a: dict, b: dict) -> list[str]:
    """The dotted keys (``config.optimizer.lr``) whose values differ between two nested dicts."""
    fa, fb = config.flatten(a), config.flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _same_config(stored: dict, cfg: dict, where: Path) -> None:
    diff = _changed_keys(stored, cfg)
    if diff:
        raise ValueError(
            f"{where} belongs to a run with another config (differs in: {', '.join(diff)}); "
            "use another --out folder or delete it"
        )


def _fingerprint(cfg: dict, lr: float) -> dict:
    """Everything that determines the run's trajectory, by name: the config, the lr it resolves
    to, the code, and the SHA-256 of every file the run reads. Equal whenever nothing changed:
    no timestamps, no MLflow run id."""
    files = {"dataset meta.json": Path(cfg["paths"]["data"]) / data.dataset_name(cfg["dataset"]) / "meta.json"}
    if cfg["paths"]["partition"]:
        folder = Path(cfg["paths"]["partition"])
        files["partition"] = folder / "partition.npz" if folder.is_dir() else folder  # as partition.load reads it
    weights_path = weights.resolve(cfg["backbone"], cfg["weights"], Path(cfg["paths"]["weights"]))
    if weights_path is not None:
        files["weights"] = weights_path
    if cfg["optimizer"]["lr"] == "calibrated":
        files["calibration"] = Path(cfg["calibration"])
    # A missing file is left out: the run fails soon after, where it reads the file, with a clearer message.
    return {"config": cfg, "lr": lr, "code version": version.code_version()} | {
        f"{name} file sha256": download.sha256_of(path) for name, path in files.items() if path.exists()}


def _resume_point(ckpt_path: Path, fingerprint: dict) -> checkpoint.RunState | None:
    """The checkpoint to continue from, or None to start from round 0. A checkpoint of other
    inputs (config, files, code) is set aside, not resumed: it says which changed."""
    saved = checkpoint.load(ckpt_path)
    if saved is None:
        return None
    changed = _changed_keys(saved.fingerprint, fingerprint)
    if not changed:
        return saved
    stale = checkpoint.set_aside(ckpt_path)
    warnings.warn(f"{ckpt_path} was made from other inputs (changed: {', '.join(changed)}); "
                  f"set aside as {stale.name}, starting from round 0 in a new MLflow run", stacklevel=3)
    return None


def summarize(rows: list[dict], cfg: dict) -> dict:
    """Best / final / last-3 / rounds-to-target figures from the metrics rows."""
    frame = pd.DataFrame(rows, columns=METRICS_COLUMNS)
    best = int(frame["val_acc"].idxmax())  # first round reaching the best
    trained = frame[frame["round"] > 0] if len(frame) > 1 else frame
    targets = {}
    for target in cfg["eval"]["targets"]:
        reached = frame.loc[frame["val_acc"] >= target, "round"]
        targets[str(target)] = int(reached.iloc[0]) if len(reached) else None
    test_at_best = frame.loc[best, "test_acc"]
    return {
        "best_val_acc": float(frame.loc[best, "val_acc"]),
        "best_round": int(frame.loc[best, "round"]),
        "test_acc_at_best": None if pd.isna(test_at_best) else float(test_at_best),
        "final_val_acc": float(frame["val_acc"].iloc[-1]),
        "final_test_acc": float(frame["test_acc"].iloc[-1]),
        "last3_val_acc": float(trained["val_acc"].dropna().iloc[-3:].mean()),  # validated rounds
        "rounds_to_target": targets,
        "rounds": int(frame["round"].iloc[-1]),
    }


def _tags(cfg: dict) -> dict:
    return cfg["tags"] | {
        "dataset": cfg["dataset"], "backbone": cfg["backbone"], "split": partition.split_label(cfg["split"]),
        "method": cfg["method"]["name"], "seed": str(cfg["seed"]), "bn": cfg["bn"],
    }


def _start_tracking(uri: str, cfg: dict, tags: dict, run_id: str | None, params: dict, environment_tags: dict):
    """A new MLflow run, or the checkpointed one reopened (refused, untouched, if its params
    differ), with the run's params and what it executes on; as a ``tracking.Mirror``."""
    from fedsq import tracking  # here, on the writer thread: MLflow takes seconds to import

    tracker = tracking.Tracker(
        uri, cfg["tracking"]["experiment"], run_id=run_id, params=params, tags=tags,
        run_name="/".join(tags[k] for k in ("dataset", "backbone", "split", "method")) + f"/seed{cfg['seed']}",
    )
    tracker.set_tags(environment_tags)  # set on a reopened run too: what the run last executed on
    return tracking.Mirror(tracker)


def _record_round(mirror: Future, rows: list[dict], state: checkpoint.RunState, out_dir: Path,
                  client_stores: tuple[ClientStore, ...]) -> None:
    """A finished round's metrics.csv, its checkpoint, then its MLflow metrics: the files are the
    run's record, so a slow or absent store never holds them back. Every round logs each row
    MLflow lacks, so the first to reach the store replays what an outage or a kill -9 made it
    miss. Client states older than the checkpoint needs are deleted only once it is on disk."""
    write_atomic(out_dir / "metrics.csv", lambda p: pd.DataFrame(rows, columns=METRICS_COLUMNS).to_csv(p, index=False))
    state.mlflow_run_id = mirror.result().run_id
    checkpoint.save(out_dir / "checkpoint.pt", state)
    for store in client_stores:
        store.prune(rows[-1]["round"])
    mirror.result().record(lambda tracker: tracker.log_history(rows))


def _finish_tracking(mirror: Future, summary: dict, out_dir: Path) -> None:
    """The run's whole record in MLflow, marked FINISHED, then summary.json: its presence marks
    a finished run, so it is written last. A store still away does not hold it back: a warning
    says how to replay what MLflow missed."""
    from fedsq import tracking

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "summary.json"
        staged.write_text(json.dumps(summary, indent=2))
        recorded = mirror.result().record(lambda tracker: tracking.record_end(tracker, out_dir, staged))
        write_atomic(out_dir / "summary.json", lambda p: p.write_text(staged.read_text()))
    if not recorded:
        warnings.warn(f"MLflow run {summary['mlflow_run_id']} lacks part of {out_dir}'s records; once the store "
                      f"answers, `fedsq tracking sync {out_dir}` replays them", stacklevel=2)


def run(cfg: dict, out_dir: Path, simulation: Callable[[dict, Path], Simulation] = Simulation, *,
        record: Path | None = None, reuse: list[Path] = ()) -> dict:
    """Run (or resume, or skip if finished) the federated run ``cfg`` in ``out_dir``; return its summary.

    ``simulation`` builds the run's ``Simulation`` from (cfg, out_dir): ``fedsq.flower`` passes one
    whose clients train on Flower SuperNodes. ``record``: a folder the finished run's record is
    copied to (``fedsq.records``); a record there, or in one of the ``reuse`` run folders, whose
    key equals this run's is taken instead of training: the run then costs seconds.
    """
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    cfg = json.loads(json.dumps(cfg))  # the form it takes in summary.json and the checkpoint
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        _same_config(summary["config"], cfg, summary_path)
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)  # left by a run stopped before it retired it (see _train)
    else:
        summary = _train_or_reuse(cfg, out_dir, simulation, [record] * (record is not None) + list(reuse))
    if record is not None and summary.get("reused_from") != str(record):  # a record taken whole stays as computed
        records.save_run(out_dir, record)
    return summary


def _train_or_reuse(cfg: dict, out_dir: Path, simulation: Callable[[dict, Path], Simulation],
                    candidates: list[Path]) -> dict:
    uri = tracking_uri.check(cfg["tracking"]["uri"])  # before anything is built or changed: fails in seconds
    device = resolve_device(cfg["device"])  # likewise
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lr, lr_source = config.resolve_lr(cfg)
    fingerprint = _fingerprint(cfg, lr)
    record_key = records.key(fingerprint)
    tags = _tags(cfg)
    own = {"lr": lr, "lr_source": lr_source, "record_key": record_key,
           "tags": {k: tags[k] for k in ("dataset", "backbone", "split", "method", "seed", "lr_mode", "bn")},
           "config": cfg}
    tracking_args = (uri, cfg, tags, config.flatten(cfg) | {"lr": lr, "lr_source": lr_source},
                     environment.describe(device))
    found = records.find(candidates, record_key)
    if found is not None:
        return _reuse(found, out_dir, own, tracking_args)
    return _train(cfg, out_dir, simulation, started, fingerprint, own, tracking_args)


def _reuse(found: Path, out_dir: Path, own: dict, tracking_args: tuple) -> dict:
    """A run whose record exists already: its files, and an MLflow run of this store holding them."""
    summary = records.restored_summary(found, out_dir, own)
    uri, cfg, tags, params, environment_tags = tracking_args
    if not cfg["paths"]["partition"]:  # the run made its own: made again, for the MLflow run's artifacts
        dataset = data.load(cfg["dataset"], Path(cfg["paths"]["data"]))
        labels = np.asarray(dataset.train.y)
        partition.write(partition.make(labels, cfg["split"]), labels, out_dir / "partition", dataset.num_classes)
    with SerialWorker("fedsq-outputs") as outputs:
        mirror = outputs.submit(_start_tracking, uri, cfg, tags, None, params, environment_tags)
        summary["mlflow_run_id"] = mirror.result().run_id
        outputs.submit(_finish_tracking, mirror, summary, out_dir)
        outputs.drain()
    print(f"{out_dir}: reused the record in {found} (same record key: config, lr, input files, numerics)")
    return summary


def _train(cfg: dict, out_dir: Path, simulation: Callable[[dict, Path], Simulation], started: float,
           fingerprint: dict, own: dict, tracking_args: tuple) -> dict:
    ckpt_path = out_dir / "checkpoint.pt"
    lr = own["lr"]
    saved = _resume_point(ckpt_path, fingerprint)
    if saved is None:
        # From round 0 nothing of an earlier run may leak in: ClientStore serves a client "the
        # latest version before round r", which an earlier run's rounds would be. Deleted, not
        # set aside: without their run they are of no use.
        if (out_dir / "client_state").exists():
            shutil.rmtree(out_dir / "client_state")
        (out_dir / "metrics.csv").unlink(missing_ok=True)
    uri, _, tags, params, environment_tags = tracking_args
    # Everything the run records (metrics.csv, checkpoints, MLflow) is written in order by one
    # background thread, overlapping the training; MLflow's start (seconds of imports and store
    # set-up) there overlaps the set-up of data and model.
    # At most one round's record waits behind the one being written (back-pressure on a slow disk).
    with SerialWorker("fedsq-outputs", max_waiting=1) as outputs:
        mirror = outputs.submit(
            _start_tracking, uri, cfg, tags, saved.mlflow_run_id if saved else None, params, environment_tags)
        try:
            sim = simulation(cfg, out_dir)
            summary = _simulate(cfg, lr, fingerprint, sim, saved, outputs, mirror, out_dir, started) | own
            outputs.submit(_finish_tracking, mirror, summary, out_dir)
            outputs.drain()
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            outputs.submit(lambda: mirror.result().record(lambda tracker: tracker.finish(status)))
            for failure in outputs.wait():
                if failure is not err:
                    warnings.warn(f"while stopping a {status} run: {type(failure).__name__}: {failure}", stacklevel=2)
            raise
    # Retired once summary.json is there, so that a forced rerun (Snakemake deletes summary.json
    # first) starts from round 0. A run stopped just before this line leaves both files: a start
    # that finds summary.json removes the checkpoint (run); one that does not (Snakemake deletes
    # a failed job's outputs) resumes the finished rounds, to the same summary in the same MLflow run.
    ckpt_path.unlink()
    return summary


def _simulate(cfg: dict, lr: float, fingerprint: dict, sim: Simulation, saved: checkpoint.RunState | None,
              outputs: SerialWorker, mirror: Future, out_dir: Path, started: float) -> dict:
    """The rounds from the first unfinished one; returns the summary's figures."""
    if sim.partition_dir is None:
        outputs.submit(sim.write_partition, out_dir / "partition")
    if saved is None:
        global_state, rows, samples, elapsed_before, first = sim.global_state(), [], 0, 0.0, 0
        correct_at_best = None
    else:
        global_state = {k: v.to(sim.device) for k, v in saved.global_state.items()}
        sim.strategy.load_state_dict(saved.strategy)
        rows, samples, elapsed_before, first = saved.metrics, saved.samples_trained, saved.wall_seconds, saved.round + 1
        correct_at_best = saved.correct_at_best

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    rounds = cfg["rounds"]
    for r in tqdm(range(first, rounds + 1), desc="rounds", unit="round", initial=first, total=rounds + 1):
        row = {"round": r, "train_loss": None, "lr": None}
        if r > 0:
            row["lr"] = round_lr(cfg, lr, r)
            # A failed background job (say, a full disk) stops the run within a client.
            global_state, row["train_loss"], trained = sim.train_round(r, row["lr"], global_state, outputs.check)
            samples += trained
        sim.model.load_state_dict(global_state)
        if r % cfg["eval"]["val_every"] == 0 or r == rounds:
            row["val_acc"], row["val_loss"], val_correct = sim.evaluate_images("val")
        # Tested at every new best validation accuracy too, so that test_acc_at_best is measured.
        new_best = "val_acc" in row and all(
            row["val_acc"] > earlier["val_acc"] for earlier in rows if earlier["val_acc"] is not None)
        if r % cfg["eval"]["test_every"] == 0 or r == rounds or new_best:
            row["test_acc"], row["test_loss"], test_correct = sim.evaluate_images("test")
        if new_best:
            correct_at_best = {"val": val_correct, "test": test_correct}
        every = cfg["eval"]["drift_every"]
        if every and (r % every == 0 or r == rounds):
            row["gate_agreement"], row["gate_agreement_pretrained_bn"] = sim.gate_agreement()
        row["samples_trained"], row["wall_seconds"] = samples, elapsed()
        rows.append({c: row.get(c) for c in METRICS_COLUMNS})
        state = checkpoint.RunState(**checkpoint.snapshot({
            "round": r, "global_state": global_state, "strategy": sim.strategy.state_dict(),
            "metrics": list(rows), "samples_trained": samples,
            "wall_seconds": row["wall_seconds"], "fingerprint": fingerprint, "correct_at_best": correct_at_best,
        }))
        outputs.submit(_record_round, mirror, list(rows), state, out_dir, sim.client_stores)
        outputs.check()

    sim.model.load_state_dict(global_state)
    client_acc = sim.client_accuracy()
    outputs.drain()  # every round recorded, and the MLflow run id known
    return summarize(rows, cfg) | {
        "wall_seconds": elapsed(), "samples_trained": samples,
        "client_acc": {"mean": float(client_acc.mean()), "std": float(client_acc.std()),
                       "min": float(client_acc.min()), "max": float(client_acc.max())},
        "mlflow_run_id": mirror.result().run_id,
        "correct_at_best": correct_at_best,
    }

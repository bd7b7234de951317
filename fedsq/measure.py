"""The measured estimate (`fedsq estimate --measure`): a pipeline config's hours from timed steps.

For each (dataset, backbone, method) of the grid it builds the engine's own ``Simulation`` on the
device the config asks for, with the config's threads, and times:

- a training step at the batch size FL clients train (the engine cuts a client into near-equal
  batches no larger than batch_size) and at the calibration's, through ``Simulation.train_client``
  (the method's own step: DualCopy for FedSQ, FedProx's term, BatchNorm policy), after a warm-up:
  a client of k steps less one of 1 step, over k - 1, each in one epoch (as a client's last);
- a client's fixed cost (optimizer, state loads, the strategy's and BatchNorm policy's client
  hooks, adding its state to the round's average): one client of 1 step less 1 step;
- an evaluation batch (``Simulation.predict``) of eval.batch_size images, per image;
- FedSQ's regime-cache build (``Simulation.cache_regimes``), per image;
- a job's fixed start: a fresh interpreter importing the engine (and CUDA's start on a GPU), then
  MLflow creating a run in a SQLite store (FL runs only; counted after the imports, though the
  engine overlaps it with the set-up on its writer thread), plus the ``Simulation`` construction
  (data onto the device, partition, model build) less its cache build.

The images are tiny synthetic arrays of the dataset's image shape and class count (prepared or
not: timing does not depend on the pixels), and a backbone whose pretrained weights are not on
disk is built with random weights of the same architecture. Left out: Snakemake's own time,
reading a prepared dataset from disk, a run's checkpoints and closing MLflow records (written on a
background thread), the server update. The pipeline's other jobs (data, weights, partitions,
tracking store, report) are counted apart, each as one launch, their own work not timed.

Hours of a job = fixed start + cache build + clients x client cost + steps x step time + images
evaluated x time per image, with the counts of ``fedsq.estimate`` (in expectation over client
sampling). The grid's wall time is the sum over jobs over the jobs run at once, each as fast as
alone: the machine's cores over the config's threads, on a GPU at most $FEDSQ_SLOTS_PER_GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from fedsq import estimate

# Image shapes (H, W, C) of the datasets of estimate.KNOWN_SIZES not prepared yet, as data.prepare writes them.
IMAGE_SHAPES = {"cinic10": (32, 32, 3), "cifar100": (32, 32, 3), "digits": (8, 8, 1)}
STEPS = 3  # training steps of the longer timed client
REPEATS = 3  # each timed client, its median taken: one slow call on a busy machine does not count

# A fresh job's start: the interpreter, the engine's imports (torch, torchvision, timm), the
# device's start, then MLflow's import and a run created in a store the pipeline made beforehand.
LAUNCH_SCRIPT = """
import sys, time
import torch
import fedsq.engine
torch.empty(0, device=sys.argv[1])
imported = time.perf_counter()
from fedsq import tracking
tracking.Tracker(sys.argv[2], "fedsq-estimate")
print(time.perf_counter() - imported)  # MLflow's part, which a calibration job does not have
"""


class Timing(NamedTuple):
    """Seconds measured for one (dataset, backbone, method)."""
    client_step: float  # one training step at the FL clients' batch size
    calibration_step: float  # one at the central calibration's
    client: float  # a client's fixed cost, beyond its steps
    eval_image: float
    cache_image: float  # FedSQ's regime-cache build, per image; 0 where nothing is cached
    setup: float  # Simulation construction, less its cache build


class Launch(NamedTuple):
    """Seconds of a fresh job's start, before its Simulation is built."""
    calibration: float  # interpreter, imports, the device's start
    fl_run: float  # and MLflow's import and run creation


class Measured(NamedTuple):
    table: pd.DataFrame  # one row per (dataset, backbone, method), hours and the timings behind them
    launch: Launch
    jobs_at_once: int
    other_jobs: int  # the pipeline's jobs that neither calibrate nor train (``other_jobs``)
    device: str  # where it was measured, in words
    notes: list[str]

    @property
    def job_hours(self) -> float:
        return float(self.table["job_h"].sum())

    @property
    def wall_hours(self) -> float:
        return self.job_hours / self.jobs_at_once

    @property
    def other_hours(self) -> float:
        """The other jobs, each costed as one launch without MLflow: their own work is not timed."""
        return self.other_jobs * self.launch.calibration / 3600


def image_shape(row: estimate.Row) -> tuple[int, int, int]:
    """(H, W, C) of a row's images: the prepared meta.json's where row's sizes came from it, else the table."""
    if row.where.endswith("meta.json"):
        return tuple(json.loads(Path(row.where).read_text())["image_shape"])
    return IMAGE_SHAPES[row.dataset]  # estimate.dataset_sizes knows no other unprepared dataset


def client_batch(samples: float, batch_size: int) -> int:
    """The batch a client of ``samples`` trains: near-equal batches no larger than batch_size (at least 2)."""
    return max(2, round(samples / math.ceil(samples / batch_size)))


def _write_synthetic(root: Path, dataset: str, shape: tuple, classes: int, sizes: dict[str, int]) -> None:
    """A prepared dataset folder (data.prepare's files) of random uint8 images, every class present."""
    from fedsq.data import dataset_name

    folder = root / dataset_name(dataset)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        np.save(folder / f"{split}_x.npy", rng.integers(0, 256, (n, *shape), dtype=np.uint8))
        np.save(folder / f"{split}_y.npy", np.arange(n, dtype=np.int64) % classes)
    (folder / "meta.json").write_text(json.dumps({"classes": [str(c) for c in range(classes)], "image_shape": list(shape)}))


def _clock(device) -> Callable[[Callable[[], object]], float]:
    """Seconds a call takes on ``device``: a GPU's queued kernels finished before each reading."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return timed


def fl_batch(row: estimate.Row) -> int:
    """The batch an FL client of the mean size trains."""
    return client_batch(row.sizes["train"] / row.cfg["split"]["num_clients"], row.cfg["batch_size"])


def calibration_batch(row: estimate.Row) -> int:
    """The batch of central calibration: the whole training set as one client."""
    return client_batch(row.sizes["train"], row.cfg["batch_size"])


def time_row(row: estimate.Row, work: Path) -> tuple[Timing, list[str]]:
    """The timings of one (dataset, backbone, method) on its config's device, and what was assumed."""
    from fedsq.engine import Simulation, resolve_device

    cfg = json.loads(json.dumps(row.cfg))
    notes = []
    if not _weights_present(cfg):
        cfg["weights"] = "scratch"
        notes.append(f"{row.backbone}: pretrained weights not on disk, timed with random weights of the same architecture")
    batch, central_batch = fl_batch(row), calibration_batch(row)
    eval_batch = cfg["eval"]["batch_size"]
    sizes = {"train": STEPS * max(batch, central_batch), "val": eval_batch, "test": eval_batch}
    root = Path(tempfile.mkdtemp(dir=work))
    _write_synthetic(root / "data", row.dataset, image_shape(row), row.classes, sizes)
    cfg["paths"] |= {"data": str(root / "data"), "partition": None}
    cfg["split"] |= {"scheme": "iid", "num_clients": 1}  # the timed client is given its samples
    cfg["clients_per_round"] = None
    cfg["eval"]["val_size"] = None

    timed = _clock(resolve_device(cfg["device"]))
    built: list[Simulation] = []
    setup = timed(lambda: built.append(Simulation(cfg, root / "run")))
    sim = built[0]
    cache = timed(sim.cache_regimes) if sim.regime_caches else 0.0
    state, lr = sim.global_state(), 0.01

    def client(samples: int, steps: int) -> float:
        """Median seconds of one client: one epoch of ``steps`` batches of ``samples``, its state averaged."""
        def train():
            average = sim.new_average()
            sim.train_client(0, np.arange(steps * samples), 1, lr, state)
            average.add(sim.model.state_dict(), steps * samples)
        # One epoch, as a client's last (pooled BatchNorm averages its statistics there).
        sim.cfg["batch_size"] = samples
        return float(np.median([timed(train) for _ in range(REPEATS)]))

    def step(samples: int) -> tuple[float, float]:
        """(seconds of a step at batch ``samples``, of a client of one such step)."""
        one = client(samples, 1)
        return (client(samples, STEPS) - one) / (STEPS - 1), one

    client(batch, 1)  # warm-up: allocations, kernel choices
    client_step, one_step = step(batch)
    calibration_step, _ = step(central_batch)
    sim.predict("val")  # warm-up
    eval_image = float(np.median([timed(lambda: sim.predict("val")) for _ in range(REPEATS)])) / eval_batch
    timing = Timing(
        client_step=client_step, calibration_step=calibration_step,
        client=max(0.0, one_step - client_step),  # 0 where the machine's noise exceeds it
        eval_image=eval_image, cache_image=cache / sum(sizes.values()), setup=max(0.0, setup - cache))
    return timing, notes


def _weights_present(cfg: dict) -> bool:
    """Whether the run's weights are on disk (``imagenet`` would be fetched otherwise); scratch needs none."""
    if cfg["weights"] == "scratch":
        return True
    if cfg["weights"] == "imagenet":
        return (Path(cfg["paths"]["weights"]) / f"{cfg['backbone']}_imagenet.pt").exists()
    return Path(cfg["weights"]).is_file()


def time_launch(device: str, threads: int, work: Path) -> Launch:
    """A fresh job's start (LAUNCH_SCRIPT), in a subprocess with the job's threads."""
    from fedsq import tracking

    uri = f"sqlite:///{work / 'mlflow.db'}"
    tracking.init_store(uri, "fedsq-estimate")  # the pipeline's tracking_init job, done once: not a job's start
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LAUNCH_SCRIPT, device, uri], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout  # its errors on the terminal
    total = time.perf_counter() - start
    return Launch(calibration=total - float(out), fl_run=total)


def jobs_at_once(config: dict, device_type: str, jobs_per_device: int | None) -> tuple[int, str]:
    """(jobs run at once on one device, why): as given; else as many as this machine's cores hold at
    the config's FL threads (Snakemake's --cores), on a GPU at most $FEDSQ_SLOTS_PER_GPU."""
    if jobs_per_device is not None:
        return jobs_per_device, "--jobs-per-device"
    cores, threads = len(os.sched_getaffinity(0)), config["resources"]["fl"]["threads"]
    held, why = max(1, cores // threads), f"{cores} cores / resources.fl.threads {threads}"
    if device_type == "cuda":
        from fedsq import gpu_slots

        slots = gpu_slots.slots_per_gpu()
        return min(slots, held), f"the least of $FEDSQ_SLOTS_PER_GPU {slots} and {why}"
    return held, why


def other_jobs(config: dict) -> int:
    """The workflow's jobs besides calibrations and FL runs: a data preparation per dataset, a weights
    fetch per ImageNet backbone, a partition per dataset x split x seed, the tracking store, the report."""
    fetched = sum(block["weights"] == "imagenet" for block in config["backbones"].values())
    partitions = len(config["datasets"]) * len(config["splits"]) * len(config["seeds"])
    return len(config["datasets"]) + fetched + partitions + 2


def job_hours(row: estimate.Row, calibration: dict, timing: Timing, launch: Launch) -> tuple[float, float]:
    """(hours of one FL run, of one calibration job) of ``row`` from its timings."""
    cfg, sizes = row.cfg, row.sizes
    no_flops = estimate.ImageFlops(0, 0, 0)  # counts only
    run = estimate.run_cost(cfg, sizes, no_flops)
    batch = fl_batch(row)
    clients = cfg["rounds"] * (cfg["clients_per_round"] or cfg["split"]["num_clients"])
    cache = sum(sizes.values()) * timing.cache_image
    fl_run = (launch.fl_run + timing.setup + cache + clients * timing.client
              + run.trained / batch * timing.client_step + run.evaluated * timing.eval_image)

    cal = estimate.calibration_cost(cfg, calibration, sizes, no_flops)  # every candidate lr's
    lrs = len(calibration["lrs"])
    if calibration["mode"] == "central":  # one client: the pooled training set, in full batches
        cal_clients, step = lrs, cal.trained / calibration_batch(row) * timing.calibration_step
    else:
        rounds = estimate.calibration_rounds(calibration, cfg)
        cal_clients = lrs * rounds * (cfg["clients_per_round"] or cfg["split"]["num_clients"])
        step = cal.trained / batch * timing.client_step
    calibration_job = (launch.calibration + lrs * (timing.setup + cache) + cal_clients * timing.client + step
                       + cal.evaluated * timing.eval_image)
    return fl_run / 3600, calibration_job / 3600


def measure(config: dict, jobs_per_device: int | None = None, work: Path | None = None) -> Measured:
    """Time a validated pipeline config's (dataset, backbone, method)s on its device; their hours."""
    import torch
    from tqdm.auto import tqdm

    from fedsq.engine import resolve_device

    grid_rows = estimate.grid_rows(config)
    device = resolve_device(grid_rows[0].cfg["device"])
    threads = config["resources"]["fl"]["threads"]
    parallel, why = jobs_at_once(config, device.type, jobs_per_device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # as the job's OMP_NUM_THREADS
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} thread(s) per job"
    notes = [f"jobs at once: {parallel} ({why})"]
    table = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        try:
            launch = time_launch(str(device), threads, Path(tmp))
            torch.empty(0, device=device)  # the device's start is in the launch, not in the first row's set-up
            progress = tqdm(grid_rows, desc="fedsq estimate --measure", unit="pair", file=sys.stderr)
            for row in progress:
                progress.set_postfix_str(f"{row.dataset} {row.backbone} {row.method}")
                timing, row_notes = time_row(row, Path(tmp))
                notes += [n for n in row_notes if n not in notes]
                per_run, per_calibration = job_hours(row, config["calibration"], timing, launch)
                table.append({
                    "dataset": row.dataset, "backbone": row.backbone, "method": row.method,
                    "runs": row.runs, "calibrations": row.calibrations, **timing._asdict(),
                    "run_h": per_run, "calibration_h": per_calibration,
                    "job_h": row.runs * per_run + row.calibrations * per_calibration,
                })
        finally:
            torch.set_num_threads(threads_before)
    return Measured(pd.DataFrame(table), launch, parallel, other_jobs(config), where, notes)


def render(result: Measured, floor: estimate.Estimate, peak_tflops: float = estimate.H100_BF16_TFLOPS,
           utilisation: float = estimate.UTILISATION) -> str:
    """The measured hours as a Markdown table, after what they rest on; the FLOP floor of ``floor`` after it."""
    t = result.table
    ms = lambda column: t[column].map(lambda s: f"{1e3 * s:.3g}")  # noqa: E731
    shown = pd.DataFrame({
        "dataset": t["dataset"], "backbone": t["backbone"], "method": t["method"],
        "FL runs": t["runs"], "calibrations": t["calibrations"],
        "ms / step (FL client)": ms("client_step"), "ms / step (calibration)": ms("calibration_step"),
        "ms / client": ms("client"), "ms / image eval": ms("eval_image"), "ms / image cache": ms("cache_image"),
        "set-up s": t["setup"].map(lambda s: f"{s:.3g}"),
        "h / FL run": t["run_h"].map(lambda h: f"{h:.3g}"), "h / calibration": t["calibration_h"].map(lambda h: f"{h:.3g}"),
        "job-h": t["job_h"].map(lambda h: f"{h:.3g}"),
    })
    total = {"dataset": "total", "FL runs": t["runs"].sum(), "calibrations": t["calibrations"].sum(),
             "job-h": f"{result.job_hours:.3g}"}
    shown = pd.concat([shown, pd.DataFrame([total])]).fillna("")
    return "\n".join([
        f"Measured on {result.device}: training steps through Simulation.train_client after a warm-up, one "
        "evaluation batch, FedSQ's regime-cache build, on tiny synthetic images of each dataset's shape.",
        f"Fixed start of a job: launch {result.launch.fl_run:.3g} s per FL run (interpreter, imports, device, MLflow "
        f"run creation), {result.launch.calibration:.3g} s per calibration (no MLflow), plus each Simulation's set-up.",
        "job-h = FL runs x h / FL run + calibrations x h / calibration; h / job = start + cache + clients x ms / client "
        "+ steps x ms / step + images evaluated x ms / image (counts as in `fedsq estimate`).",
        *result.notes,
        "",
        shown.to_markdown(index=False, disable_numparse=True, colalign=["left"] * 3 + ["right"] * 11),
        "",
        f"Total: {result.job_hours:.3g} job-hours; wall {result.wall_hours:.3g} h ({60 * result.wall_hours:.3g} min) "
        f"with {result.jobs_at_once} jobs at once on one device (job-h / {result.jobs_at_once}; each job as fast as "
        "alone).",
        f"The pipeline's {result.other_jobs} other jobs (data, weights, partitions, tracking store, report), each "
        f"costed as one launch ({60 * result.other_hours:.3g} min in all; their own work and Snakemake's not timed), "
        "on a cluster they run off the GPUs; on one CPU machine they share its cores: wall with them "
        f"{60 * (result.wall_hours + result.other_hours / result.jobs_at_once):.3g} min.",
        f"FLOP floor at {utilisation:.0%} of peak ({peak_tflops:g} TFLOP/s; --utilisation, --peak-tflops): "
        f"{estimate.flop_floor_hours(floor, peak_tflops, utilisation):.3g} GPU-h, a lower bound, not the estimate.",
    ])

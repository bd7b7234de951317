"""What a pipeline config costs before launch: samples trained, images evaluated, FLOPs, and the
GPU-hours those FLOPs take at a stated fraction of a peak: a floor, not a forecast (``fedsq.measure``
times real steps for the estimate).

The grid (``grid``, also the workflow's list of targets) holds the calibrated runs, the equal-lr
control and the BatchNorm control; with one calibration per dataset x backbone x method x
BatchNorm form the calibrated runs use, each job is costed as the engine runs it:

- training: rounds x local_epochs x the sampled share (clients_per_round / num_clients) of the
  training set, in expectation; each sample one forward and one backward pass of the model form
  the method trains (FedSQ: DualCopy, whose forward also runs the frozen structural copy);
- evaluation: the validation images (eval.val_size) every eval.val_every rounds; the test split
  every eval.test_every rounds and at each new best validation accuracy, a number nobody knows
  before the run, so a stated share of the other validated rounds is assumed; the gating-drift
  probe; the closing per-client accuracy pass over the training set.

FLOPs per image are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real backbone
(random weights: the count does not depend on them) at the run's image size. It counts matrix
products and convolutions, a multiply-add as 2 FLOPs as GPU peaks do, and leaves out BatchNorm,
activations and FedSQ's masks. The FLOP floor divides the FLOPs by a stated fraction of a stated
peak; eager training of small images in small batches is bound by kernel launches and Python, not
FLOPs, so the hours it takes are a multiple of that floor.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from fedsq import config as run_config

H100_BF16_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 (no sparsity)
UTILISATION = 0.30  # of the peak, for small-image CNN training with host-side round logic
# Share of the validated rounds off the test schedule that set a new best validation accuracy
# (each costs a test pass). The evidence grid's runs, still climbing at 24 rounds, set one at
# about 45 % of their rounds; a 100-round curve that flattens sets fewer.
NEW_BEST_SHARE = 0.25

# Sizes of a dataset not prepared yet: (training pool, validation or None = carved out of the
# training pool by data.val_fraction, test, classes).
KNOWN_SIZES = {
    "cinic10": (90_000, 90_000, 90_000, 10),
    "cifar100": (50_000, None, 10_000, 100),
    "digits": (1_437, None, 360, 10),  # 1797 images less the 20 % data.prepare holds out for test
}

RUN_SETS = ("runs", "control", "bn_control")  # results/<run set>/
CALIBRATED = ("runs", "bn_control")  # the run sets whose lr comes from a calibration


# The pipeline config's schema, in the repository beside this package (an editable install, as `make install` makes).
PIPELINE_SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_pipeline_config(path: str | Path) -> dict:
    """A pipeline config file read and validated as Snakemake reads it, the schema's defaults filled."""
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import validate
    from snakemake_interface_common.exceptions import WorkflowError

    if not PIPELINE_SCHEMA.exists():
        raise ValueError(f"{PIPELINE_SCHEMA} is missing: run fedsq estimate from a checkout of the repository")
    try:
        config = load_configfile(str(path))
        validate(config, str(PIPELINE_SCHEMA))
    except WorkflowError as err:
        raise ValueError(f"{path}: {err}") from None
    return config


class Point(NamedTuple):
    run_set: str
    dataset: str
    backbone: str
    split: str
    method: str
    seed: int


class ImageFlops(NamedTuple):
    forward: float  # the trained form's forward pass (FedSQ: structural and quantitative copy)
    backward: float
    plain: float  # one forward of the plain network (the gating-drift probe runs those)


class Cost(NamedTuple):
    trained: float  # samples
    evaluated: float  # images
    train_flops: float
    eval_flops: float


def grid(config: dict) -> list[Point]:
    """Every FL run of a validated pipeline config: the workflow's targets (common.smk) and what is costed."""
    points = []
    for run_set in RUN_SETS:
        block = config[run_set] if run_set != "runs" else {}
        if not block.get("enabled", True):
            continue
        points += [Point(run_set, *p) for p in itertools.product(
            block.get("datasets") or config["datasets"],
            block.get("backbones") or list(config["backbones"]),
            block.get("splits") or config["splits"],
            config["methods"],
            block.get("seeds") or config["seeds"],
        )]
    return points


def dataset_sizes(name: str, data_root: Path, val_fraction: float, seed: int) -> tuple[dict, int, str]:
    """({train, val, test}: images, classes, where they came from): the prepared meta.json when it
    was prepared as the config asks, else the built-in table."""
    from fedsq.data import dataset_name

    meta_path = Path(data_root) / dataset_name(name) / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") in ({}, {"val_fraction": val_fraction, "seed": seed}):  # {}: the dataset's own val
            return meta["sizes"], meta["num_classes"], str(meta_path)
    if name not in KNOWN_SIZES:
        raise ValueError(f"datasets: no size known for {name!r}; prepare it (`fedsq data prepare {name}`)")
    train, val, test, classes = KNOWN_SIZES[name]
    where = "built-in table"
    if val is None:
        val = math.ceil(val_fraction * train)  # data.prepare's stratified carve rounds up
        train -= val
        where += f", data.val_fraction {val_fraction}"
    return {"train": train, "val": val, "test": test}, classes, where


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient a convolution's backward computes (input, weight) costs its forward's FLOPs.
    PyTorch's own formula counts a grouped convolution's weight gradient ``groups`` times over
    (EfficientNet-Lite0's depthwise convolutions: its whole backward 40x too high)."""
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def _count(model, image_size: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per image of one training step of ``model`` (on the device of its
    parameters: on the meta device a count is shapes only, no arithmetic, a fraction of a second)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    custom = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    batch = 2  # BatchNorm does not train on one image; counts are linear in the batch
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    model.train()
    with FlopCounterMode(display=False, custom_mapping=custom) as forward:
        logits = model(x)
    with FlopCounterMode(display=False, custom_mapping=custom) as backward:
        F.cross_entropy(logits, y).backward()
    return forward.get_total_flops() / batch, backward.get_total_flops() / batch


_COUNTS: dict[tuple, tuple[float, float]] = {}  # one count per (backbone, image size, classes, model form)


def _form_counts(backbone: str, image_size: int, classes: int, method: dict, deadline: float | None):
    import torch
    from torch import nn

    from fedsq import models, strategies
    from fedsq.client_store import ClientStore

    # SCAFFOLD needs a store to be built; wrap never writes to it.
    strategy = strategies.build(method, ClientStore(Path("unused")))
    form = repr(strategy.wrap(nn.Identity()))  # "Identity()" for the plain network, "DualCopy(...)" for FedSQ
    key = (backbone, image_size, classes, form)
    if key not in _COUNTS:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("counting FLOPs takes too long")
        with torch.device("meta"):  # shapes without weights: nothing to initialise or compute
            model = strategy.wrap(models.build(backbone, classes, None))
        _COUNTS[key] = _count(model, image_size)
    return _COUNTS[key]


def image_flops(backbone: str, image_size: int, classes: int, method: dict, deadline: float | None = None) -> ImageFlops:
    """FLOPs per image of the model form ``method`` (a run config's method block) trains."""
    forward, backward = _form_counts(backbone, image_size, classes, method, deadline)
    plain, _ = _form_counts(backbone, image_size, classes, {"name": "fedavg"}, deadline)
    return ImageFlops(forward, backward, plain)


def _rounds(rounds: int, every: int) -> set[int]:
    """The rounds the engine evaluates on an ``every``-round schedule: its multiples and the last."""
    return {r for r in range(rounds + 1) if r % every == 0 or r == rounds}


def _sampled_share(cfg: dict) -> float:
    clients = cfg["split"]["num_clients"]
    return (cfg["clients_per_round"] or clients) / clients


def _caches_regimes(cfg: dict) -> bool:
    """Whether FedSQ computes its structural copy's regimes once per sample, before round 0
    (method.regime_cache; auto is assumed to fit in memory), not in every forward pass."""
    return cfg["method"].get("regime_cache", False) in ("auto", True)


def _model_flops(cfg: dict, sizes: dict, flops: ImageFlops, trained: float, evaluated: float) -> tuple[float, float]:
    """(training, evaluation) FLOPs of one Simulation: ``trained`` samples, ``evaluated`` images."""
    structural = flops.forward - flops.plain  # FedSQ's structural forward; 0 for the plain network
    if structural and _caches_regimes(cfg):
        # Every sample trained or evaluated (validation: its eval.val_size subset) once through the
        # structural copy; then each pass is Q alone.
        val_images = min(cfg["eval"]["val_size"] or sizes["val"], sizes["val"])
        return (trained * (flops.plain + flops.backward) + sizes["train"] * structural,
                evaluated * flops.plain + (val_images + sizes["test"]) * structural)
    return trained * (flops.forward + flops.backward), evaluated * flops.forward


def run_cost(cfg: dict, sizes: dict, flops: ImageFlops, new_best_share: float = NEW_BEST_SHARE) -> Cost:
    """One FL run of the resolved run config ``cfg``, in expectation over client sampling."""
    rounds, ev = cfg["rounds"], cfg["eval"]
    trained = rounds * cfg["local_epochs"] * _sampled_share(cfg) * sizes["train"]
    validated, tested = _rounds(rounds, ev["val_every"]), _rounds(rounds, ev["test_every"])
    test_passes = len(tested) + new_best_share * len(validated - tested)
    val_images = min(ev["val_size"] or sizes["val"], sizes["val"])
    model_images = len(validated) * val_images + test_passes * sizes["test"] + sizes["train"]
    # Each drift measurement runs the model's own gates and the reference's, with its own and the
    # pretrained BatchNorm statistics: two plain forward passes per probe image, twice.
    drift_images = 2 * min(ev["probe_size"], sizes["val"]) * (len(_rounds(rounds, ev["drift_every"])) if ev["drift_every"] else 0)
    train_flops, eval_flops = _model_flops(cfg, sizes, flops, trained, model_images)
    return Cost(trained, model_images + drift_images, train_flops, eval_flops + drift_images * 2 * flops.plain)


def calibration_split(config: dict, split: str) -> str:
    """The split a run of ``split`` has its lr tuned on: "central" (the pooled training set), its own
    (calibration.split: each) or the one calibration.split names; one calibration per such split."""
    calibration = config["calibration"]
    if calibration["mode"] == "central":
        return "central"
    return split if calibration["split"] == "each" else calibration["split"]


def calibration_rounds(calibration: dict, cfg: dict) -> int:
    """Federated calibration's rounds per candidate lr: calibration.rounds, or (null) the run's."""
    return calibration["rounds"] or cfg["rounds"]


def calibration_cost(cfg: dict, calibration: dict, sizes: dict, flops: ImageFlops) -> Cost:
    """One calibration (every candidate lr, each its own Simulation) of the pipeline's calibration block."""
    val_images = min(cfg["eval"]["val_size"] or sizes["val"], sizes["val"])
    if calibration["mode"] == "central":
        trained, val_passes = calibration["epochs"] * sizes["train"], 1
    else:
        rounds = calibration_rounds(calibration, cfg)
        trained, val_passes = rounds * cfg["local_epochs"] * _sampled_share(cfg) * sizes["train"], rounds
    lrs = len(calibration["lrs"])
    train_flops, eval_flops = _model_flops(cfg, sizes, flops, trained, val_passes * val_images)
    return Cost(lrs * trained, lrs * val_passes * val_images, lrs * train_flops, lrs * eval_flops)


class Row(NamedTuple):
    """One (dataset, backbone, method) of a grid: its job counts and its resolved run config."""
    dataset: str
    backbone: str
    method: str
    runs: int
    calibrations: int
    cfg: dict  # the base run config with this dataset, backbone (its weights, image size) and method
    sizes: dict  # {train, val, test}: images
    classes: int
    where: str  # where the sizes came from


def grid_rows(config: dict) -> list[Row]:
    """The grid of a validated pipeline config by (dataset, backbone, method), sorted."""
    try:
        base = run_config.load(config["run"])
    except ValueError as err:
        raise ValueError(f"config key run: {err}") from None
    points = grid(config)
    runs = pd.Series([(p.dataset, p.backbone, p.method) for p in points]).value_counts()
    # One calibration per (dataset, backbone, method), BatchNorm form and split tuned on that a
    # calibrated run set uses.
    bn_forms = {(p.dataset, p.backbone, p.method, config["bn_control"]["bn"] if p.run_set == "bn_control" else base["bn"],
                 calibration_split(config, p.split))
                for p in points if p.run_set in CALIBRATED}
    calibrations = pd.Series([form[:3] for form in bn_forms]).value_counts()
    result = []
    for key in sorted(runs.index):
        dataset, backbone, method = key
        block = config["backbones"][backbone]
        cfg = run_config.load(config["run"], [f"dataset={dataset}", f"backbone={backbone}", f"method.name={method}",
                                              f"weights={block['weights']}"]
                              + ([f"image_size={block['image_size']}"] if block["image_size"] else []))
        sizes, classes, where = dataset_sizes(
            dataset, cfg["paths"]["data"], config["data"]["val_fraction"], config["data"]["seed"])
        result.append(Row(*key, int(runs[key]), int(calibrations.get(key, 0)), cfg, sizes, classes, where))
    return result


class Estimate(NamedTuple):
    table: pd.DataFrame  # one row per (dataset, backbone, method)
    sizes: dict[str, str]  # dataset -> "train/val/test (where from)"


def estimate(config: dict, new_best_share: float | None = None, deadline: float | None = None) -> Estimate:
    """The cost of a validated pipeline config (its schema's defaults filled, as Snakemake does)."""
    new_best_share = NEW_BEST_SHARE if new_best_share is None else new_best_share
    table, sizes = [], {}
    for row in grid_rows(config):
        cfg = row.cfg
        sizes[row.dataset] = f"{row.sizes['train']}/{row.sizes['val']}/{row.sizes['test']} ({row.where})"
        flops = image_flops(row.backbone, cfg["image_size"], row.classes, cfg["method"], deadline)
        run = run_cost(cfg, row.sizes, flops, new_best_share)
        calibration = calibration_cost(cfg, config["calibration"], row.sizes, flops)
        table.append({
            "dataset": row.dataset, "backbone": row.backbone, "method": row.method,
            "runs": row.runs, "calibrations": row.calibrations,
            "forward": flops.forward, "backward": flops.backward,
            "regimes": ("cached" if _caches_regimes(cfg) else "live") if flops.forward > flops.plain else "",
            **{f"run_{k}": row.runs * v for k, v in run._asdict().items()},
            **{f"calibration_{k}": row.calibrations * v for k, v in calibration._asdict().items()},
        })
    return Estimate(pd.DataFrame(table), sizes)


def _row_flops(r) -> tuple[float, float]:
    """(the FL runs' FLOPs, all FLOPs with the calibrations') of a table row or of the table's sum."""
    runs = r["run_train_flops"] + r["run_eval_flops"]
    return runs, runs + r["calibration_train_flops"] + r["calibration_eval_flops"]


def _gpu_hours(flops: float, peak_tflops: float, utilisation: float) -> float:
    return flops / (peak_tflops * 1e12 * utilisation) / 3600


def flop_floor_hours(est: Estimate, peak_tflops: float = H100_BF16_TFLOPS, utilisation: float = UTILISATION) -> float:
    """GPU-hours of the whole grid's FLOPs (calibrations included) at ``utilisation`` of ``peak_tflops``."""
    return _gpu_hours(_row_flops(est.table.sum(numeric_only=True))[1], peak_tflops, utilisation)


def _number(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def render(est: Estimate, peak_tflops: float = H100_BF16_TFLOPS, utilisation: float = UTILISATION,
           new_best_share: float = NEW_BEST_SHARE) -> str:
    """The estimate as a Markdown table, after the assumptions it rests on."""
    rows = [(tuple(r[["dataset", "backbone", "method"]]), r) for _, r in est.table.iterrows()]
    total = est.table.sum(numeric_only=True)
    shown = []
    for (dataset, backbone, method), r in [*rows, (("total", "", ""), total)]:
        run_flops, all_flops = _row_flops(r)
        per_image = dataset != "total"
        shown.append({
            "dataset": dataset, "backbone": backbone, "method": method,
            "FL runs": f"{r['runs']:.0f}", "calibrations": f"{r['calibrations']:.0f}",
            "trained (M samples)": _number((r["run_trained"] + r["calibration_trained"]) / 1e6),
            "evaluated (M images)": _number((r["run_evaluated"] + r["calibration_evaluated"]) / 1e6),
            "GFLOP fwd / image": f"{r['forward'] / 1e9:.3f}" if per_image else "",
            "GFLOP bwd / sample": f"{r['backward'] / 1e9:.3f}" if per_image else "",
            "FedSQ regimes": r["regimes"] if per_image else "",
            "eval share of FL runs": f"{r['run_eval_flops'] / run_flops:.1%}",
            "FLOP floor GPU-h": _number(_gpu_hours(all_flops, peak_tflops, utilisation)),
        })
    run_flops, all_flops = _row_flops(total)
    calibration_hours = _gpu_hours(all_flops - run_flops, peak_tflops, utilisation)
    return "\n".join([
        "dataset sizes (train/val/test): " + "; ".join(f"{d} {s}" for d, s in est.sizes.items()),
        "FLOPs per image: torch FlopCounterMode on each backbone at its image size; fwd = the trained form's "
        "forward (FedSQ: structural + quantitative copy), bwd = its backward. FedSQ regimes live: the structural "
        "copy runs in every forward pass; cached (method.regime_cache, auto assumed to fit in memory): once per "
        "sample of every split before round 0, each pass after it the quantitative copy's alone.",
        f"Assumed: a new best validation accuracy, hence an extra test pass, at {new_best_share:.0%} of the "
        "validated rounds off the test schedule (--new-best-share); clients sampled at their expected share.",
        f"FLOP floor at {utilisation:.0%} of {peak_tflops:g} TFLOP/s (--utilisation, --peak-tflops; default an H100's "
        f"dense bf16 peak), calibrations' {_number(calibration_hours)} GPU-h included: a lower bound, not the "
        "estimate (launch-bound eager steps take a multiple of it); `fedsq estimate --measure` times real steps.",
        "",
        pd.DataFrame(shown).to_markdown(index=False, disable_numparse=True, colalign=["left"] * 3 + ["right"] * 6 + ["left", "right", "right"]),
    ])


def summary_line(config: dict, budget_s: float = 30.0) -> str:
    """One line for the start of a Snakemake run; never raises (a cost estimate must not stop a run)."""
    try:
        est = estimate(config, deadline=time.monotonic() + budget_s)
    except TimeoutError:
        return f"fedsq estimate: skipped (counting FLOPs took over {budget_s:g} s); `fedsq estimate` prints it"
    except Exception as err:  # noqa: BLE001 - any failure: report it and let the workflow run
        return f"fedsq estimate: unavailable ({type(err).__name__}: {err})"
    total = est.table.sum(numeric_only=True)
    run_flops, _ = _row_flops(total)
    return (f"fedsq estimate: {total['runs']:.0f} FL runs + {total['calibrations']:.0f} calibrations; FLOP floor "
            f"{_number(flop_floor_hours(est))} GPU-h at {UTILISATION:.0%} of an H100's "
            f"{H100_BF16_TFLOPS:g} TFLOP/s (a lower bound); evaluation {total['run_eval_flops'] / run_flops:.0%} of the "
            "FL runs' compute (`fedsq estimate --measure --configfile ...` times real steps)")

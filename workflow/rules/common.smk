# Config validation, the grid, paths, input functions and wildcard constraints, shared by
# all rule files. Every path a job reads or writes is built here.

import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from fedsq import config as run_config
from fedsq import data, dualcopy, models
from fedsq import estimate
from fedsq.estimate import grid
from fedsq.partition import parse_split_label


validate(config, "../schemas/config.schema.yaml")


def _check_subset(key, chosen, allowed, where):
    extra = [value for value in chosen or () if value not in allowed]
    if extra:
        raise ValueError(f"config key {key}: {extra} not {where}; allowed: {list(allowed)}")


# Grid values are checked against the run config schema, the one list of datasets, backbones
# and methods, and against the libraries (a folder name, a torchvision or timm model, a network
# FedSQ can gate); the base run config is resolved with it, so a bad key stops us before any job.
_RUN_KEYS = run_config.SCHEMA["properties"]
for _key, _run_key, _check in [("datasets", "dataset", data.dataset_name), ("backbones", "backbone", models.backbone)]:
    for _value in config[_key]:
        try:
            run_config.load({_run_key: _value})
            _check(_value)
        except ValueError as err:
            raise ValueError(f"config key {_key}: {err}") from None
_check_subset("methods", config["methods"], _RUN_KEYS["method"]["properties"]["name"]["enum"], "a method")
if "fedsq" in config["methods"]:
    for _name in config["backbones"]:
        _ungated = [g.__name__ for g in models.backbone(_name).gates if not issubclass(g, dualcopy.GATED_ACTIVATIONS)]
        if _ungated:
            raise ValueError(
                f"config key backbones: {_name} has {', '.join(_ungated)} activations, which FedSQ cannot gate "
                "(it needs ReLU, ReLU6 or Hardtanh); run it without fedsq in methods"
            )
for _block in ("control", "bn_control"):
    for _key in ("datasets", "backbones", "splits", "seeds"):
        _check_subset(f"{_block}.{_key}", config[_block][_key], config[_key], "in the grid")
_CALIBRATION_SPLIT = [] if config["calibration"]["split"] == "each" else [("calibration.split", config["calibration"]["split"])]
for _key, _label in [*(("splits", s) for s in config["splits"]), *_CALIBRATION_SPLIT]:
    try:
        parse_split_label(_label)
    except ValueError as err:
        raise ValueError(f"config key {_key}: {err}") from None
try:
    RUN = run_config.load(config["run"])
except ValueError as err:
    raise ValueError(f"config key run: {err}") from None


# Rules run `python -m fedsq`: that of the interpreter running Snakemake, which has fedsq (it
# imported it above), also when its venv is not activated (`.venv/bin/snakemake`). Jobs inherit
# this PATH (envvars passes it on to remote ones); under `--sdm conda` each rule's env is
# activated inside its job, so its python comes first instead.
envvars:
    "PATH",


_PATH = os.environ["PATH"]
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), _PATH])


# A dataset is named in result paths, wildcards and the data root by the folder it is prepared
# into: a built-in's name, or your folder's (file's) name for imagefolder:<folder> (npz:<file>).
DATASETS = {data.dataset_name(dataset): dataset for dataset in config["datasets"]}
if len(DATASETS) < len(config["datasets"]):
    raise ValueError(f"config key datasets: two of {config['datasets']} share a folder name; rename one")


# results/<set>/ holds the calibrated runs, results/control/ the equal-lr control and
# results/bn_control/ every method again with other BatchNorm statistics (bn_control.bn),
# calibrated in that form; the value is the run's tags.lr_mode.
LR_MODES = {"runs": "calibrated", "control": "equal", "bn_control": "calibrated"}

DATA_ROOT = RUN["paths"]["data"]
WEIGHTS_DIR = RUN["paths"]["weights"]
RUN_CONFIG = "results/config/run.yaml"
TRACKING_READY = f"results/tracking/{config['tracking']['experiment']}.ready"
RUN_DIR = "results/{run_set}/{dataset}/{backbone}/{split}/{method}/seed{seed}"
PARTITION_DIR = "results/partitions/{dataset}/{split}/seed{seed}"
# {tuned_on}: the split the lr was tuned on, or "central" (pooled data; calibration_split).
CALIBRATION = "results/calibration/{dataset}/{backbone}/{tuned_on}/bn-{bn}/{method}.json"
# Where a finished run's or calibration's record goes (and is reused from), under config key records.
RECORDS = config["records"]


def calibration_split(run_split):
    return estimate.calibration_split(config, run_split)


def run_bn(run_set):
    """The BatchNorm policy (run config key bn) of the runs in results/<run_set>/."""
    return config["bn_control"]["bn"] if run_set == "bn_control" else RUN["bn"]


def _alternatives(values):
    return "|".join(re.escape(str(v)) for v in values)


wildcard_constraints:
    run_set=_alternatives(LR_MODES),
    dataset=_alternatives(DATASETS),
    backbone=_alternatives(config["backbones"]),
    split=_alternatives(config["splits"]),
    tuned_on=_alternatives({calibration_split(split) for split in config["splits"]}),
    method=_alternatives(config["methods"]),
    bn=_alternatives(_RUN_KEYS["bn"]["enum"]),
    seed=r"\d+",


def run_summaries():
    """summary.json of every calibrated run and of both controls where enabled."""
    return [
        f"{RUN_DIR}/summary.json".format(**point._replace(dataset=data.dataset_name(point.dataset))._asdict())
        for point in grid(config)
    ]


def partition_class_counts():
    """class_counts.csv of every partition the runs use."""
    return expand(
        f"{PARTITION_DIR}/class_counts.csv",
        dataset=list(DATASETS),
        split=config["splits"],
        seed=config["seeds"],
    )


def _weights_input(backbone):
    if config["backbones"][backbone]["weights"] == "imagenet":
        return {"weights": f"{WEIGHTS_DIR}/{backbone}_imagenet.pt"}
    return {}


def calibrate_inputs(wildcards):
    return {
        "run_config": RUN_CONFIG,
        "data": f"{DATA_ROOT}/{wildcards.dataset}/meta.json",
        **_weights_input(wildcards.backbone),
    }


def fl_inputs(wildcards):
    inputs = {
        **calibrate_inputs(wildcards),
        "partition": f"{PARTITION_DIR}/partition.npz".format(**wildcards),
        "tracking": TRACKING_READY,
    }
    if LR_MODES[wildcards.run_set] == "calibrated":
        inputs["calibration"] = CALIBRATION.format(
            bn=run_bn(wildcards.run_set), tuned_on=calibration_split(wildcards.split), **wildcards)
    else:
        # The same seed's run at its tuned lr: where that lr is the common one, the two runs are one
        # run (same record key), which is then reused, not trained twice.
        inputs["tuned_run"] = f"{RUN_DIR}/summary.json".format(**{**wildcards, "run_set": "runs"})
    return inputs


def _model_settings(wildcards, split, seed):
    """What one (dataset, backbone, method, split, seed) sets on top of the base run config."""
    backbone = config["backbones"][wildcards.backbone]
    settings = {
        "dataset": DATASETS[wildcards.dataset],
        "backbone": wildcards.backbone,
        "weights": backbone["weights"],
        "method.name": wildcards.method,
        "seed": seed,
        "split.seed": seed,
        **{f"split.{key}": value for key, value in parse_split_label(split).items()},
    }
    if backbone["image_size"] is not None:
        settings["image_size"] = backbone["image_size"]
    return settings


def _yaml_value(value):
    # `fedsq --set key=value` reads value as YAML: write it plain when that reads back the same
    # (digits, 0.1), else as JSON, which is YAML too (null, "123" as a string).
    text = str(value)
    return text if yaml.safe_load(text) == value else json.dumps(value)


def _as_set_args(settings):
    return " ".join(f"--set {shlex.quote(f'{key}={_yaml_value(value)}')}" for key, value in settings.items())


def calibrate_overrides(wildcards):
    calibration = config["calibration"]
    split = calibration["split"] if wildcards.tuned_on == "central" else wildcards.tuned_on
    settings = _model_settings(wildcards, split, calibration["seed"])
    return _as_set_args(settings | {"bn": wildcards.bn})


def calibrate_args(wildcards, output):
    calibration = config["calibration"]
    args = ["--lrs", *map(str, calibration["lrs"]), "--mode", calibration["mode"], "--epochs", str(calibration["epochs"])]
    if calibration["rounds"] is not None:
        args += ["--rounds", str(calibration["rounds"])]
    if calibration["extend"]:
        args += ["--extend", str(calibration["extend"])]
    if RECORDS is not None:
        args += ["--record", str(Path(RECORDS) / Path(output.calibration).relative_to("results"))]
    return shlex.join(args)


def fl_record_args(wildcards, input, output):
    """--record (and --reuse: the same seed's tuned run, for the equal-lr control) of one FL run."""
    run_dir = Path(output.summary).parent
    args = []
    if RECORDS is not None:
        args += ["--record", str(Path(RECORDS) / run_dir.relative_to("results"))]
    if "tuned_run" in input.keys():
        args += ["--reuse", str(Path(input.tuned_run).parent)]
    return shlex.join(args)


def fl_overrides(wildcards, input):
    settings = _model_settings(wildcards, wildcards.split, int(wildcards.seed))
    settings["paths.partition"] = str(Path(input.partition).parent)
    settings["tags.lr_mode"] = LR_MODES[wildcards.run_set]
    settings["bn"] = run_bn(wildcards.run_set)
    settings["tracking.experiment"] = config["tracking"]["experiment"]
    if config["tracking"]["uri"] is not None:
        settings["tracking.uri"] = config["tracking"]["uri"]
    if LR_MODES[wildcards.run_set] == "calibrated":
        settings["optimizer.lr"] = "calibrated"
        settings["calibration"] = input.calibration
    else:
        settings["optimizer.lr"] = config["control"]["lr"]
    return _as_set_args(settings)


def tracking_init_args():
    args = ["--experiment", config["tracking"]["experiment"]]
    if config["tracking"]["uri"] is not None:
        args += ["--uri", config["tracking"]["uri"]]
    return shlex.join(args)


def weights_fetch_args(wildcards):
    backbone = config["backbones"][wildcards.backbone]
    args = ["--source", backbone["source"]]
    if backbone["sha256"] is not None:
        args += ["--sha256", backbone["sha256"]]
    return shlex.join(args)


def partition_args():
    split = RUN["split"]
    return shlex.join(["--num-clients", str(split["num_clients"]), "--min-size", str(split["min_size"])])


def prepared_image_size():
    """The side your own images of mixed sizes are resized to: data.image_size, else the largest
    image size of the grid, so that no run upsamples what preparing shrank."""
    sizes = [RUN["image_size"], *(b["image_size"] for b in config["backbones"].values() if b["image_size"])]
    return config["data"]["image_size"] or max(sizes)


def data_prepare_args(wildcards):
    options = config["data"]
    args = [DATASETS[wildcards.dataset], "--val-fraction", str(options["val_fraction"]), "--seed", str(options["seed"])]
    args += ["--image-size", str(prepared_image_size())]
    mirror = options["mirrors"].get(DATASETS[wildcards.dataset])
    if mirror is not None:
        args += ["--url", mirror["url"]]
        if "md5" in mirror:
            args += ["--md5", mirror["md5"]]
    return shlex.join(args)

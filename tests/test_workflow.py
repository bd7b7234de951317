"""The Snakemake workflow: the jobs it plans, the configs it rejects, lint, and the CI grid end to end.

Snakemake runs in a subprocess with the working directory in tmp_path, so files a previous
`make demo` left under results/ never change what is planned.
"""

import io
import itertools
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from fedsq import estimate

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "config.yaml"
OFFLINE = REPO / "config" / "offline.yaml"
EVIDENCE = REPO / "config" / "evidence.yaml"
CI = REPO / ".test" / "config" / "config.yaml"
SHARDS = REPO / ".test" / "config-shards" / "config.yaml"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def snakemake(*args: str | Path, workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", REPO / "Snakefile", "--directory", workdir, *args]
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, cwd=REPO)


def log(result: subprocess.CompletedProcess) -> str:
    # Snakemake writes its log to stderr but some errors to stdout.
    return result.stdout + result.stderr


def planned(configfile: Path, workdir: Path) -> pd.DataFrame:
    """One row per output file the workflow would write: output_file, rule, status, plan."""
    result = snakemake("--summary", "--configfile", configfile, workdir=workdir)
    assert result.returncode == 0, log(result)
    return pd.read_csv(io.StringIO(result.stdout), sep="\t")


def expected_runs(cfg: dict) -> set[str]:
    grid = itertools.product(cfg["datasets"], cfg["backbones"], cfg["splits"], cfg["methods"], cfg["seeds"])
    return {f"results/runs/{d}/{b}/{s}/{m}/seed{seed}/summary.json" for d, b, s, m, seed in grid}


@pytest.mark.parametrize(
    "configfile", [PAPER, OFFLINE, EVIDENCE, CI, SHARDS], ids=["paper", "offline", "evidence", "ci", "ci-shards"])
def test_dry_run_plans_one_fl_job_per_grid_point(configfile, tmp_path):
    cfg = yaml.safe_load(configfile.read_text())
    plan = planned(configfile, tmp_path)
    outputs_of = lambda rule: set(plan.loc[plan["rule"] == rule, "output_file"])  # noqa: E731

    fl = outputs_of("fl")
    assert {f for f in fl if f.startswith("results/runs/")} == expected_runs(cfg)
    assert all(f.startswith(("results/runs/", "results/control/", "results/bn_control/")) for f in fl)
    for run_set, enabled_by_default in [("control", True), ("bn_control", False)]:
        block = cfg.get(run_set, {})
        runs = {f for f in fl if f.startswith(f"results/{run_set}/")}
        if block.get("enabled", enabled_by_default):
            # Every method again, over the chosen subset of the grid.
            subset = {key: block.get(key) or cfg[key] for key in ("datasets", "backbones", "splits", "seeds")}
            assert len(runs) == len(list(itertools.product(*subset.values()))) * len(cfg["methods"])
        else:
            assert not runs

    assert outputs_of("data_prepare") == {f"resources/data/{d}/meta.json" for d in cfg["datasets"]}
    imagenet = [b for b, spec in cfg["backbones"].items() if spec.get("weights", "imagenet") == "imagenet"]
    assert outputs_of("weights_fetch") == {f"resources/weights/{b}_imagenet.pt" for b in imagenet}
    partitions = {f for f in outputs_of("partition") if f.endswith("partition.npz")}
    assert partitions == {
        f"results/partitions/{d}/{s}/seed{seed}/partition.npz"
        for d, s, seed in itertools.product(cfg["datasets"], cfg["splits"], cfg["seeds"])
    }
    # Each method calibrated in every BatchNorm form it runs in, on the split its lr is tuned on.
    calibration = cfg.get("calibration", {})

    def tuned_on(split):
        if calibration.get("mode", "central") == "central":
            return "central"
        return split if calibration.get("split", "iid") == "each" else calibration.get("split", "iid")

    splits_of_form = {cfg.get("run", {}).get("bn", "pooled"): cfg["splits"]}
    if cfg.get("bn_control", {}).get("enabled", False):
        splits_of_form[cfg["bn_control"].get("bn", "frozen")] = cfg["bn_control"].get("splits") or cfg["splits"]
    assert outputs_of("calibrate") == {
        f"results/calibration/{d}/{b}/{tuned_on(s)}/bn-{bn}/{m}.json"
        for bn, splits in splits_of_form.items()
        for d, b, m, s in itertools.product(cfg["datasets"], cfg["backbones"], cfg["methods"], splits)
    }
    # fedsq estimate costs the calibrations the workflow runs.
    rows = estimate.grid_rows(estimate.load_pipeline_config(configfile))
    assert sum(row.calibrations for row in rows) == len(outputs_of("calibrate"))
    experiment = cfg.get("tracking", {}).get("experiment", "fedsq")
    assert outputs_of("tracking_init") == {f"results/tracking/{experiment}.ready"}
    assert "results/tables/results.csv" in outputs_of("report")
    if configfile == PAPER:
        # 2 datasets x 2 backbones x 3 splits x 3 methods x 3 seeds, calibrated and at the equal lr.
        assert len(fl) == 2 * 108


def test_the_default_config_applies_only_without_a_configfile(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(CI.read_text())  # the default here; its bn_control is on
    result = snakemake("--summary", workdir=tmp_path)
    assert result.returncode == 0, log(result)
    default_plan = pd.read_csv(io.StringIO(result.stdout), sep="\t")
    assert any(f.startswith("results/bn_control/") for f in default_plan["output_file"])
    # A given config replaces the default: its keys (bn_control.enabled) do not leak in.
    fl = set(planned(SHARDS, tmp_path).query("rule == 'fl'")["output_file"])
    assert fl == expected_runs(yaml.safe_load(SHARDS.read_text()))


def test_fl_jobs_get_their_grid_point_and_lr(tmp_path):
    targets = [
        "results/runs/digits/resnet18/dir0.5/fedsq/seed0/summary.json",
        "results/control/digits/resnet18/dir0.5/fedavg/seed0/summary.json",
    ]
    result = snakemake(*targets, "--dry-run", "--printshellcmds", "--configfile", CI, workdir=tmp_path)
    assert result.returncode == 0, log(result)
    commands = {line.split(" --out ")[1].split()[0]: line for line in log(result).splitlines() if "fedsq run" in line}
    calibrated = commands["results/runs/digits/resnet18/dir0.5/fedsq/seed0"]
    for setting in [
        "method.name=fedsq",
        "split.scheme=dirichlet",
        "split.alpha=0.5",
        "seed=0",
        "optimizer.lr=calibrated",
        "calibration=results/calibration/digits/resnet18/iid/bn-pooled/fedsq.json",
        "bn=pooled",
        "paths.partition=results/partitions/digits/dir0.5/seed0",
        "tags.lr_mode=calibrated",
    ]:
        assert f"--set {setting} " in calibrated
    control = commands["results/control/digits/resnet18/dir0.5/fedavg/seed0"]
    assert "--set optimizer.lr=0.05 " in control and "--set tags.lr_mode=equal " in control
    assert "calibration=" not in control


def test_bn_control_runs_every_method_with_its_bn_and_its_own_calibration(tmp_path):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(ci_config_with(lambda c: c.update(bn_control={"enabled": True}))))
    target = "results/bn_control/digits/resnet18/dir0.5/fedsq/seed0/summary.json"
    result = snakemake(target, "--dry-run", "--printshellcmds", "--configfile", configfile, workdir=tmp_path)
    assert result.returncode == 0, log(result)
    commands = [line for line in log(result).splitlines() if "fedsq run" in line or "fedsq calibrate" in line]
    run = next(c for c in commands if "fedsq run" in c)
    for setting in ["bn=frozen", "optimizer.lr=calibrated", "tags.lr_mode=calibrated",
                    "calibration=results/calibration/digits/resnet18/iid/bn-frozen/fedsq.json"]:
        assert f"--set {setting} " in run
    calibrate = next(c for c in commands if "fedsq calibrate" in c)
    assert "--set bn=frozen " in calibrate and "bn-frozen/fedsq.json" in calibrate


def ci_config_with(edit) -> dict:
    cfg = yaml.safe_load(CI.read_text())
    edit(cfg)
    return cfg


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["run"].update(dataset="cifar100"), "instance['run']['dataset']"),
        (lambda c: c["run"].update(optimizer={"lr": 0.1}), "instance['run']['optimizer']['lr']"),
        (lambda c: c["calibration"].update(mode="grid"), "instance['calibration']['mode']"),
        (lambda c: c.update(resources={"gpu": -1}), "instance['resources']['gpu']"),
        (lambda c: c.update(seeds=[0, 0]), "instance['seeds']"),
    ],
    ids=["grid-key-in-run", "lr-in-run", "calibration-mode", "gpu<0", "repeated-seed"],
)
def test_schema_rejects_bad_config_naming_the_key(edit, message):
    with pytest.raises(WorkflowError) as err:
        validate(ci_config_with(edit), str(SCHEMA))
    assert message in str(err.value.args)


def test_schema_fills_defaults():
    cfg = ci_config_with(lambda c: c.pop("calibration"))
    validate(cfg, str(SCHEMA))
    assert cfg["calibration"]["mode"] == "central"
    assert cfg["resources"]["fl"]["mem_mb"] > 0
    assert cfg["backbones"]["resnet18"]["weights"] == "scratch"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(methods=["fedavg", "fedbogus"]), "config key methods: ['fedbogus'] not a method"),
        (lambda c: c.update(splits=["iid", "dirichlet"]), "config key splits: bad split label 'dirichlet'"),
        (lambda c: c["control"].update(backbones=["alexnet"]), "config key control.backbones: ['alexnet'] not in"),
        (lambda c: c["run"].update(bn="bogus"), "config key run: bn: 'bogus' is not one of"),
    ],
    ids=["unknown-method", "bad-split-label", "control-outside-grid", "bad-run-key"],
)
def test_bad_config_stops_the_workflow_before_any_job(tmp_path, edit, message):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(ci_config_with(edit)))
    result = snakemake("--cores", "1", "--configfile", configfile, workdir=tmp_path)
    assert result.returncode != 0
    assert message in log(result), log(result)
    assert not (tmp_path / "results").exists()


def test_lint_is_clean(tmp_path):
    result = snakemake("--lint", "--configfile", PAPER, workdir=tmp_path)
    assert result.returncode == 0, log(result)
    assert "Congratulations" in log(result), log(result)


def mlflow_run_count(workdir: Path) -> int:
    with sqlite3.connect(workdir / "results" / "mlflow.db") as db:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


@pytest.mark.slow
@pytest.mark.parametrize("configfile", [CI, SHARDS], ids=["ci", "ci-shards"])
def test_ci_grid_end_to_end(tmp_path, configfile):
    result = snakemake("--cores", "2", "--configfile", configfile, workdir=tmp_path)
    assert result.returncode == 0, log(result)[-3000:]

    cfg = yaml.safe_load(configfile.read_text())
    plan = planned(configfile, tmp_path)
    summaries = set(plan.loc[plan["rule"] == "fl", "output_file"])
    assert expected_runs(cfg) <= summaries
    for summary in summaries:
        assert (tmp_path / summary).is_file()
        assert (tmp_path / summary).with_name("metrics.csv").is_file()
    for table in ("results.csv", "results.md", "results.tex", "claims.csv", "claims.md"):
        assert (tmp_path / "results" / "tables" / table).is_file()
    assert mlflow_run_count(tmp_path) == len(summaries)

    # A second invocation finds everything done: no job, no extra MLflow run.
    again = snakemake("--cores", "2", "--configfile", configfile, workdir=tmp_path)
    assert again.returncode == 0, log(again)[-3000:]
    assert "Nothing to be done" in log(again)
    assert mlflow_run_count(tmp_path) == len(summaries)

    html = tmp_path / "results" / "report.html"
    report = snakemake("--configfile", configfile, "--report", html, workdir=tmp_path)
    assert report.returncode == 0, log(report)[-3000:]
    assert html.stat().st_size > 0


def own_data_config(tmp_path) -> Path:
    """A grid over an image folder and an npz file, with a torchvision and a timm model by name."""
    from tests.test_data import image_folder

    folder = image_folder(tmp_path / "pets")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "blobs.npz", x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y_train=np.arange(40) % 2)
    cfg = ci_config_with(lambda c: c.update(
        datasets=[f"imagefolder:{folder}", f"npz:{tmp_path / 'blobs.npz'}"],
        backbones={"torchvision/vgg11_bn": {"weights": "imagenet"}, "timm/resnet10t": {"weights": "scratch"}},
        splits=["iid"],
        bn_control={"enabled": False},
        control={"enabled": False},
    ))
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    return configfile


def test_own_data_and_models_by_name_plan_under_their_folder_names(tmp_path):
    plan = planned(own_data_config(tmp_path), tmp_path)
    outputs_of = lambda rule: set(plan.loc[plan["rule"] == rule, "output_file"])  # noqa: E731
    assert outputs_of("data_prepare") == {"resources/data/pets/meta.json", "resources/data/blobs/meta.json"}
    assert outputs_of("weights_fetch") == {"resources/weights/torchvision/vgg11_bn_imagenet.pt"}
    assert outputs_of("fl") == {
        f"results/runs/{d}/{b}/iid/{m}/seed0/summary.json"
        for d, b, m in itertools.product(["pets", "blobs"], ["torchvision/vgg11_bn", "timm/resnet10t"], ["fedavg", "fedsq"])
    }
    target = "results/runs/pets/timm/resnet10t/iid/fedsq/seed0/summary.json"
    result = snakemake(target, "--dry-run", "--printshellcmds", "--forceall", "--configfile", tmp_path / "config.yaml",
                       workdir=tmp_path)
    assert result.returncode == 0, log(result)
    commands = log(result)
    assert f"fedsq data prepare imagefolder:{tmp_path / 'pets'} --val-fraction 0.1 --seed 0 --image-size 32" in commands
    assert f"fedsq partition --dataset imagefolder:{tmp_path / 'pets'} " in commands
    assert f"--set dataset=imagefolder:{tmp_path / 'pets'} --set backbone=timm/resnet10t " in commands


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(backbones={"torchvision/vgg99": {}}), "config key backbones: backbone torchvision/vgg99: torchvision has no"),
        (lambda c: c.update(backbones={"torchvision/mobilenet_v3_small": {"weights": "scratch"}}),
         "config key backbones: torchvision/mobilenet_v3_small has Hardswish, Hardsigmoid activations, which FedSQ cannot gate"),
        (lambda c: c.update(datasets=["imagefolder:/a/pets", "npz:/b/pets.npz"]), "config key datasets: two of"),
        (lambda c: c.update(datasets=["mnist"]), "config key datasets: dataset: 'mnist' is not valid"),
    ],
    ids=["unknown-torchvision-model", "fedsq-on-hardswish", "same-folder-name", "unknown-dataset"],
)
def test_bad_own_data_or_backbone_stops_the_workflow(tmp_path, edit, message):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(ci_config_with(edit)))
    result = snakemake("--dry-run", "--configfile", configfile, workdir=tmp_path)
    assert result.returncode != 0 and message in log(result), log(result)


@pytest.mark.slow
def test_own_image_folder_end_to_end(tmp_path):
    configfile = own_data_config(tmp_path)
    cfg = yaml.safe_load(configfile.read_text())
    cfg.update(datasets=cfg["datasets"][:1], backbones={"timm/resnet10t": {"weights": "scratch"}})
    cfg["run"].update(rounds=1)
    cfg["calibration"].update(lrs=[0.05])
    configfile.write_text(yaml.safe_dump(cfg))
    result = snakemake("--cores", "2", "--configfile", configfile, workdir=tmp_path)
    assert result.returncode == 0, log(result)[-3000:]
    claims = pd.read_csv(tmp_path / "results" / "tables" / "claims.csv")
    assert set(claims["dataset"]) == {cfg["datasets"][0]} and set(claims["backbone"]) == {"timm/resnet10t"}

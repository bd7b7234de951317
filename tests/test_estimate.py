"""The cost estimate (fedsq.estimate, `fedsq estimate`) and the evaluation schedule it costs."""

import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from fedsq import cli, config, data, engine, estimate, measure

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "config.yaml"


@pytest.fixture(autouse=True)
def no_prepared_data(tmp_path, monkeypatch):
    """Run where no dataset is prepared: sizes come from the built-in table, whatever resources/ holds."""
    monkeypatch.chdir(tmp_path)


def test_flop_count_matches_a_hand_count():
    # 8x8 RGB: a 3x3 conv (3 -> 4), a depthwise 3x3 conv (4 groups), a linear layer (256 -> 10).
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(256, 10))
    conv, depthwise, linear = 2 * 64 * 4 * 3 * 9, 2 * 64 * 4 * 1 * 9, 2 * 256 * 10  # 2 FLOPs per multiply-add
    forward, backward = estimate._count(model, image_size=8)
    assert forward == conv + depthwise + linear
    # Each layer's weight gradient costs its forward, and so does its input gradient but the
    # first layer's (the images need none). A grouped conv counts once, not `groups` times.
    assert backward == conv + 2 * depthwise + 2 * linear


def test_fedsq_adds_exactly_one_forward_pass():
    plain = estimate.image_flops("resnet18", 32, 10, {"name": "fedavg"})
    fedsq = estimate.image_flops("resnet18", 32, 10, {"name": "fedsq", "gate_maxpool": False})
    assert plain.forward > 0 and plain.plain == plain.forward
    assert fedsq.forward == 2 * plain.forward  # the structural copy's forward, then the quantitative copy's
    assert fedsq.backward == plain.backward  # no gradient flows into the structural copy
    assert fedsq.plain == plain.forward
    assert estimate.image_flops("resnet18", 32, 10, {"name": "scaffold"}) == plain  # built without a client store


@pytest.mark.parametrize("regime_cache", [False, "auto"])
def test_run_cost_by_hand(regime_cache):
    cfg = config.load({"rounds": 10, "split": {"num_clients": 10}, "clients_per_round": 5, "local_epochs": 2,
                       "eval": {"val_every": 2, "val_size": 100, "test_every": 5, "drift_every": 5, "probe_size": 8}})
    cfg["method"]["regime_cache"] = regime_cache
    sizes = {"train": 1000, "val": 500, "test": 200}
    fedsq = estimate.ImageFlops(forward=2, backward=3, plain=1)  # a structural forward of 1 on top of Q's
    cost = estimate.run_cost(cfg, sizes, fedsq, new_best_share=0.5)
    # Validated at 0 2 4 6 8 10, tested at 0 5 10 and at half of the validated rounds 2 4 6 8.
    test_passes = 3 + 0.5 * 4
    model_images = 6 * 100 + test_passes * 200 + 1000  # and the closing per-client accuracy pass
    drift_images = 2 * 8 * 3  # rounds 0 5 10; the model's and the reference's gates, twice
    trained = 10 * 2 * 0.5 * 1000
    assert cost.trained == trained and cost.evaluated == model_images + drift_images
    if regime_cache:  # the structural copy once over the samples used (validation: its 100), then Q alone
        assert cost.train_flops == trained * (1 + 3) + 1000 * 1
        assert cost.eval_flops == model_images * 1 + (100 + 200) * 1 + drift_images * 2
    else:
        assert cost.train_flops == trained * (2 + 3)
        assert cost.eval_flops == model_images * 2 + drift_images * 2


def test_sizes_from_the_table_or_a_matching_meta_json(tmp_path):
    assert estimate.dataset_sizes("cifar100", tmp_path, 0.1, 0)[:2] == ({"train": 45000, "val": 5000, "test": 10000}, 100)
    assert estimate.dataset_sizes("cinic10", tmp_path, 0.1, 0)[:2] == ({"train": 90000, "val": 90000, "test": 90000}, 10)
    meta = {"sizes": {"train": 7, "val": 2, "test": 3}, "num_classes": 10, "recipe": {"val_fraction": 0.2, "seed": 0}}
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "meta.json").write_text(json.dumps(meta))
    assert estimate.dataset_sizes("digits", tmp_path, 0.2, 0) == (meta["sizes"], 10, str(tmp_path / "digits" / "meta.json"))
    # Prepared another way: the pipeline will prepare it again, as the table says.
    assert estimate.dataset_sizes("digits", tmp_path, 0.1, 0)[0] == {"train": 1293, "val": 144, "test": 360}


def small_pipeline_config(tmp_path) -> dict:
    raw = {
        "datasets": ["digits", "cifar100"],
        "backbones": {"resnet18": {"weights": "scratch"}, "alexnet": {"image_size": 64}},
        "splits": ["iid", "dir0.5"], "methods": ["fedavg", "fedsq"], "seeds": [0, 1, 2],
        "run": {"rounds": 2, "image_size": 32},
        "control": {"splits": ["dir0.5"]},
        "bn_control": {"enabled": True, "datasets": ["digits"]},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return estimate.load_pipeline_config(path)


def test_grid_is_the_hand_expanded_product(tmp_path):
    cfg = small_pipeline_config(tmp_path)
    runs, control, bn_control = 2 * 2 * 2 * 2 * 3, 2 * 2 * 1 * 2 * 3, 1 * 2 * 2 * 2 * 3
    points = estimate.grid(cfg)
    assert len(points) == len(set(points)) == runs + control + bn_control
    table = estimate.estimate(cfg).table
    assert table["runs"].sum() == runs + control + bn_control
    # Calibrated per dataset x backbone x method in each BatchNorm form: pooled (runs), frozen (bn_control).
    assert table["calibrations"].sum() == 2 * 2 * 2 + 1 * 2 * 2
    assert set(table.loc[table["backbone"] == "alexnet", "forward"]) != set(table.loc[table["backbone"] == "resnet18", "forward"])


@pytest.mark.parametrize("regimes_cached, limit", [(True, 0.25), (False, 1 / 3)], ids=["regimes-cached", "regimes-live"])
def test_paper_grid_evaluates_in_at_most_a_quarter_of_each_runs_compute(regimes_cached, limit, monkeypatch):
    """The acceptance check of the paper config's eval block (issues 14, 19: validation every round
    on the 10k subset): at most a quarter of a run's compute with FedSQ's regime cache, the default
    where it fits in the GPU's memory; a third where S's regimes are computed live, since then every
    evaluation pass runs S as well."""
    monkeypatch.setattr(estimate, "_caches_regimes", lambda cfg: regimes_cached)
    table = estimate.estimate(estimate.load_pipeline_config(PAPER)).table
    share = table["run_eval_flops"] / (table["run_train_flops"] + table["run_eval_flops"])
    assert (share <= limit).all(), table.assign(share=share)[["dataset", "backbone", "method", "share"]]


def test_cli_prints_the_table(capsys):
    assert cli.main(["estimate", "--configfile", str(PAPER), "--utilisation", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "built-in table" in out and "50% of 989 TFLOP/s" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert "eval share of FL runs" in rows[0] and "GPU-h" in rows[0]
    assert sum(line.startswith("| cinic10 ") for line in rows) == 6 and rows[-1].startswith("| total ")


def test_cli_names_a_bad_key(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**yaml.safe_load(PAPER.read_text()), "run": {"rounds": -1}}))
    assert cli.main(["estimate", "--configfile", str(tmp_path / "bad.yaml")]) == 2
    assert "rounds" in capsys.readouterr().err


def test_summary_line_reports_or_skips(tmp_path, monkeypatch):
    cfg = small_pipeline_config(tmp_path)
    assert "FL runs" in estimate.summary_line(cfg) and "GPU-h" in estimate.summary_line(cfg)
    monkeypatch.setattr(estimate, "_COUNTS", {})  # nothing counted yet, and no time to count
    assert "skipped" in estimate.summary_line(cfg, budget_s=-1)


def test_engine_validates_and_tests_on_the_schedule_the_estimate_costs(digits_root, mlflow_uri, tmp_path):
    cfg = config.load({
        "dataset": "digits", "backbone": "resnet18", "image_size": 32, "split": {"scheme": "iid", "num_clients": 10},
        "clients_per_round": 1, "rounds": 5, "optimizer": {"lr": 0.05}, "device": "cpu",
        "eval": {"val_every": 2, "val_size": 50, "test_every": 4, "drift_every": 0},
        "paths": {"data": str(digits_root)}, "tracking": {"uri": mlflow_uri},
    })
    summary = engine.run(cfg, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    validated = metrics.dropna(subset=["val_acc"])
    assert set(validated["round"]) == estimate._rounds(5, 2) == {0, 2, 4, 5}
    assert set(metrics.dropna(subset=["test_acc"])["round"]) >= estimate._rounds(5, 4)
    assert ((validated["val_acc"] * 50).round(9) % 1 == 0).all()  # accuracies over 50 images
    assert summary["best_val_acc"] == validated["val_acc"].max()
    assert summary["last3_val_acc"] == pytest.approx(validated["val_acc"].iloc[1:].tail(3).mean())
    assert summary["test_acc_at_best"] is not None


def test_validation_subset_is_fixed_and_stratified(digits_root, tmp_path):
    def simulation(val_size):
        cfg = config.load({"dataset": "digits", "image_size": 32, "device": "cpu", "eval": {"val_size": val_size},
                           "paths": {"data": str(digits_root)}})
        return engine.Simulation(cfg, tmp_path)

    sim = simulation(50)
    subset = sim.val_subset
    assert len(subset) == 50 and torch.equal(subset, simulation(50).val_subset)
    counts = torch.bincount(sim.splits["val"][1][subset], minlength=10)
    assert counts.min() >= 4 and counts.max() <= 6  # 5 per class, give or take the rounding
    assert simulation(None).val_subset is None and simulation(10_000).val_subset is None
    with pytest.raises(ValueError, match="eval.val_size"):
        simulation(3).val_subset


def test_validation_subset_reads_fedsqs_cached_regimes_of_its_own_samples(digits_root, tmp_path):
    def val_accuracy(regime_cache):
        cfg = config.load({"dataset": "digits", "image_size": 32, "device": "cpu", "eval": {"val_size": 50},
                           "method": {"name": "fedsq", "regime_cache": regime_cache}, "paths": {"data": str(digits_root)}})
        return engine.Simulation(cfg, tmp_path).evaluate("val")

    assert val_accuracy(True) == pytest.approx(val_accuracy(False))


# The measured estimate (fedsq.measure, `fedsq estimate --measure`), on CPU with a tiny backbone.

def tiny_pipeline_config(folder: Path) -> dict:
    raw = {
        "datasets": ["digits"],
        "backbones": {"timm/test_resnet": {"weights": "imagenet"}},  # no weights file: timed with random weights
        "splits": ["iid"], "methods": ["fedavg", "fedprox", "fedsq"], "seeds": [0, 1],
        "run": {"rounds": 2, "image_size": 32, "device": "cpu", "split": {"num_clients": 4}, "batch_size": 16,
                "eval": {"batch_size": 32},
                "paths": {"data": str(folder / "data"), "weights": str(folder / "weights")}},
        "calibration": {"lrs": [0.01, 0.1], "mode": "central", "epochs": 1},
        "control": {"enabled": True, "lr": 0.03, "splits": ["iid"], "seeds": [0]},
        "resources": {"gpu": 0, "fl": {"threads": 1}, "calibrate": {"threads": 1}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return estimate.load_pipeline_config(path)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("measure")
    return measure.measure(tiny_pipeline_config(folder), work=folder)


@pytest.mark.slow  # the fixture: a fresh interpreter's imports and 3 methods' steps, 40 s on 2 busy cores
def test_measured_times_are_finite_and_positive(measured):
    t = measured.table
    assert list(zip(t["backbone"], t["method"])) == [("timm/test_resnet", m) for m in ("fedavg", "fedprox", "fedsq")]
    for column in ("client_step", "calibration_step", "eval_image", "setup", "run_h", "calibration_h", "job_h"):
        assert (t[column] > 0).all() and t[column].map(math.isfinite).all(), column
    assert (t["client"] >= 0).all()  # 0 where the machine's noise exceeds a client's fixed cost
    # Only FedSQ builds a regime cache.
    assert (t["cache_image"] > 0).tolist() == [False, False, True]
    assert 0 < measured.launch.calibration < measured.launch.fl_run  # an FL run also starts MLflow
    assert any("random weights" in note for note in measured.notes)


@pytest.mark.slow  # the fixture: a fresh interpreter's imports and 3 methods' steps, 40 s on 2 busy cores
def test_measured_totals_add_up_from_the_jobs(measured):
    t = measured.table
    assert t["runs"].tolist() == [3, 3, 3] and t["calibrations"].tolist() == [1, 1, 1]  # 2 seeds + 1 control
    assert t["job_h"].tolist() == pytest.approx((t["runs"] * t["run_h"] + t["calibrations"] * t["calibration_h"]).tolist())
    assert measured.job_hours == pytest.approx(t["job_h"].sum())
    cores = len(os.sched_getaffinity(0))
    assert measured.jobs_at_once == max(1, cores // 1)  # resources.fl.threads: 1
    assert measured.wall_hours == pytest.approx(measured.job_hours / measured.jobs_at_once)
    # digits: its preparation, 1 weights fetch, 1 split x 2 seeds of partitions, the store, the report.
    assert measured.other_jobs == 1 + 1 + 2 + 2
    assert measured.other_hours == pytest.approx(6 * measured.launch.calibration / 3600)


def test_job_hours_by_hand(tmp_path):
    """h / job = start + cache + clients x client cost + steps x step time + images evaluated x time per image."""
    pipeline = tiny_pipeline_config(tmp_path)
    row = next(r for r in estimate.grid_rows(pipeline) if r.method == "fedsq")
    timing = measure.Timing(client_step=2.0, calibration_step=3.0, client=5.0, eval_image=0.01, cache_image=0.1, setup=7.0)
    launch = measure.Launch(calibration=11.0, fl_run=13.0)
    run_h, calibration_h = measure.job_hours(row, pipeline["calibration"], timing, launch)
    train, val, test = 1293, 144, 360  # digits less 20 % test, less 10 % validation
    assert (row.sizes["train"], row.sizes["val"], row.sizes["test"]) == (train, val, test)
    cache = (train + val + test) * 0.1
    # 4 clients of 323.25 samples in batches of 16: 21 near-equal batches of 15.
    client_batch = measure.client_batch(train / 4, 16)
    assert client_batch == 15
    trained = 2 * 4 * train / 4  # rounds x clients (all sampled) x samples x 1 local epoch
    # Validated and tested at rounds 0 1 2, drift at 0 1 2 (probe 256 > 144 val images: 144), the
    # closing per-client accuracy pass over the training set.
    evaluated = 3 * val + 3 * test + train + 3 * 2 * 144
    assert run_h * 3600 == pytest.approx(13 + 7 + cache + 2 * 4 * 5 + trained / client_batch * 2 + evaluated * 0.01)
    # Central: per lr one client, the pooled set in near-equal batches of 16 (81 of 15.96), one validation pass.
    assert measure.calibration_batch(row) == 16
    assert calibration_h * 3600 == pytest.approx(11 + 2 * (7 + cache) + 2 * 5 + 2 * train / 16 * 3 + 2 * val * 0.01)
    # Federated: per lr 3 rounds of 4 clients at the FL batch, validated every round.
    federated = pipeline["calibration"] | {"mode": "federated", "rounds": 3}
    _, federated_h = measure.job_hours(row, federated, timing, launch)
    assert federated_h * 3600 == pytest.approx(
        11 + 2 * (7 + cache) + 2 * 3 * 4 * 5 + 2 * 3 * train / client_batch * 2 + 2 * 3 * val * 0.01)


def test_image_shape_of_a_prepared_dataset_or_from_the_table(digits_root, tmp_path):
    assert measure.IMAGE_SHAPES.keys() == estimate.KNOWN_SIZES.keys()
    pipeline = tiny_pipeline_config(tmp_path)
    assert measure.image_shape(estimate.grid_rows(pipeline)[0]) == (8, 8, 1)  # not prepared: the table
    pipeline["run"]["paths"]["data"] = str(digits_root)
    pipeline["data"]["val_fraction"] = 0.1  # as data.prepare's default made it
    row = estimate.grid_rows(pipeline)[0]
    assert row.where.endswith("meta.json") and measure.image_shape(row) == data.load("digits", digits_root).image_shape


def test_jobs_at_once(tmp_path, monkeypatch):
    pipeline = tiny_pipeline_config(tmp_path)
    pipeline["resources"]["fl"]["threads"] = 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert measure.jobs_at_once(pipeline, "cpu", None)[0] == 4  # 16 cores / 4 threads
    assert measure.jobs_at_once(pipeline, "cpu", 3)[0] == 3
    monkeypatch.setenv("FEDSQ_SLOTS_PER_GPU", "3")
    assert measure.jobs_at_once(pipeline, "cuda", None)[0] == 3
    monkeypatch.setenv("FEDSQ_SLOTS_PER_GPU", "6")
    assert measure.jobs_at_once(pipeline, "cuda", None)[0] == 4  # 6 slots, but the cores hold 4 jobs
    assert measure.jobs_at_once(pipeline, "cuda", 2)[0] == 2


def test_cli_measure_divides_the_wall_time_by_the_jobs_per_device(tmp_path, monkeypatch, capsys):
    """The CLI's arithmetic with stand-in timings (the measuring itself is timed above)."""
    tiny_pipeline_config(tmp_path)
    timing = measure.Timing(client_step=0.5, calibration_step=0.5, client=0.1, eval_image=0.01, cache_image=0.0, setup=2.0)
    monkeypatch.setattr(measure, "time_launch", lambda device, threads, work: measure.Launch(10.0, 20.0))
    monkeypatch.setattr(measure, "time_row", lambda row, work: (timing, []))

    def printed(*args):
        assert cli.main(["estimate", "--measure", "--configfile", str(tmp_path / "tiny.yaml"), *args]) == 0
        out = capsys.readouterr().out
        job_h, wall_h = re.search(r"Total: (\S+) job-hours; wall (\S+) h", out).groups()
        return out, float(job_h), float(wall_h)

    out, job_h, wall_h = printed("--jobs-per-device", "3")
    assert wall_h == pytest.approx(job_h / 3, rel=1e-2) and "jobs at once: 3 (--jobs-per-device)" in out
    assert "FLOP floor at 30% of peak" in out and "not the estimate" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[2].strip() for line in rows[1:]] == ["timm/test_resnet"] * 3 + [""]
    assert printed("--jobs-per-device", "1")[2] == pytest.approx(job_h, rel=1e-2)
    with pytest.raises(SystemExit):
        cli.main(["estimate", "--measure", "--configfile", str(tmp_path / "tiny.yaml"), "--jobs-per-device", "0"])
    assert "--jobs-per-device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: cuda is what the config may ask for")
def test_cli_measure_on_a_device_that_is_not_here_is_one_line(tmp_path, capsys):
    tiny_pipeline_config(tmp_path)
    raw = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    raw["run"]["device"] = "cuda"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["estimate", "--measure", "--configfile", str(tmp_path / "tiny.yaml")]) == 2
    assert "cuda" in capsys.readouterr().err

"""Run records (fedsq.records): a run with a record of the same key is reused, not trained; the
key ignores what only names or places a run and changes with what changes its numbers; and the
engine's numbers are held to committed ones, so that a change to them cannot keep old records."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from fedsq import config, engine, records

GOLDEN = Path(__file__).parent / "data" / "numerics_golden.csv"


def make_cfg(digits_root, mlflow_uri, *overrides):
    raw = {
        "dataset": "digits", "backbone": "efficientnet_lite0", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "iid", "num_clients": 10}, "clients_per_round": 1, "rounds": 1,
        "optimizer": {"lr": 0.05}, "method": {"name": "fedsq"}, "device": "cpu", "precision": "fp32",
        "eval": {"drift_every": 0, "probe_size": 32}, "paths": {"data": str(digits_root)},
        "tracking": {"uri": mlflow_uri},
    }
    return config.load(raw, overrides=list(overrides))


def test_a_run_whose_record_key_matches_is_reused_not_trained(digits_root, mlflow_uri, tmp_path, monkeypatch):
    cfg = make_cfg(digits_root, mlflow_uri)
    first = engine.run(cfg, tmp_path / "a", record=tmp_path / "record")
    assert {p.name for p in (tmp_path / "record").iterdir()} == {"summary.json", "metrics.csv", "config.yaml"}
    assert len(first["correct_at_best"]["test"]) == 360 and set(first["correct_at_best"]["test"]) <= {"0", "1"}

    def no_training(*args):
        raise AssertionError("trained a run whose record exists")

    monkeypatch.setattr(engine, "Simulation", no_training)
    # The equal-lr control's run of the same seed, at the same lr: other tags, other folder.
    control = make_cfg(digits_root, mlflow_uri, "tags.lr_mode=equal")
    recorded = (tmp_path / "record" / "summary.json").read_text()
    for out, where in [("b", {"record": tmp_path / "record"}), ("c", {"reuse": [tmp_path / "a"]})]:
        reused = engine.run(control, tmp_path / out, **where)
        assert reused["reused_from"] == str(where.get("record") or where["reuse"][0])
        assert reused["tags"]["lr_mode"] == "equal" and reused["config"] == json.loads(json.dumps(control))
        assert {k: reused[k] for k in ("best_val_acc", "correct_at_best", "record_key")} == {
            k: first[k] for k in ("best_val_acc", "correct_at_best", "record_key")}
        assert (tmp_path / out / "metrics.csv").read_text() == (tmp_path / "a" / "metrics.csv").read_text()
        run = MlflowClient(mlflow_uri).get_run(reused["mlflow_run_id"])  # a run of this store, with the record
        assert run.info.status == "FINISHED" and reused["mlflow_run_id"] != first["mlflow_run_id"]
        assert run.data.tags["lr_mode"] == "equal" and "val_acc" in run.data.metrics
    # The record taken stays the computing run's: not rewritten as reused from itself.
    assert (tmp_path / "record" / "summary.json").read_text() == recorded


def test_the_key_ignores_names_places_and_commits_and_follows_numbers(digits_root, mlflow_uri, monkeypatch):
    def key(*overrides, version="0.1.0+abc"):
        cfg = make_cfg(digits_root, mlflow_uri, *overrides)
        return records.key({"config": cfg, "lr": 0.05, "code version": version})

    same = key()
    assert key("tags.lr_mode=equal", "paths.partition=/elsewhere", "tracking.experiment=x", version="0.2+def") == same
    assert key("method.name=fedavg") != same and key("rounds=2") != same and key("seed=1") != same
    assert records.key({"config": make_cfg(digits_root, mlflow_uri), "lr": 0.1, "code version": "x"}) != same
    monkeypatch.setattr(records, "NUMERICS", records.NUMERICS + 1)
    assert key() != same


def test_channels_last_training_equals_contiguous_training(digits_root, mlflow_uri, tmp_path, monkeypatch):
    """The speed-up (channels-last Q on CPU for grouped convolutions) trains the same model, to float rounding."""
    cfg = make_cfg(digits_root, mlflow_uri)
    states = {}
    for name, layout in [("channels_last", None), ("contiguous", torch.contiguous_format)]:
        if layout is not None:
            monkeypatch.setattr(engine, "memory_format", lambda model, device: layout)
        sim = engine.Simulation(cfg, tmp_path / name)
        assert sim.memory_format == (layout or torch.channels_last)
        states[name] = sim.train_round(1, 0.05, sim.global_state())[0]
    for key, value in states["channels_last"].items():
        torch.testing.assert_close(value.float(), states["contiguous"][key].float(), atol=2e-4, rtol=1e-3, msg=key)


def test_the_engine_computes_the_committed_numbers(digits_root, mlflow_uri, tmp_path):
    """Records are reused by key, and the key knows the code only through NUMERICS. If this fails,
    the change alters what runs compute: bump records.NUMERICS (so old records are recomputed) and
    regenerate the file: `python tests/test_records.py` (or explain why the numbers moved)."""
    golden = pd.read_csv(GOLDEN)
    metrics = golden_metrics(digits_root, mlflow_uri, tmp_path)
    np.testing.assert_allclose(metrics.to_numpy(float), golden.to_numpy(float), atol=1e-4, rtol=1e-4,
                               err_msg=f"numbers moved: bump records.NUMERICS ({records.NUMERICS}) and regenerate {GOLDEN}")


def golden_metrics(digits_root, mlflow_uri, out: Path) -> pd.DataFrame:
    """The figures of a two-round FedSQ run of EfficientNet-Lite0 (the evidence grid's network)."""
    summary = engine.run(make_cfg(digits_root, mlflow_uri, "rounds=2", "clients_per_round=2"), out)
    columns = ["round", "val_acc", "val_loss", "test_acc", "test_loss", "train_loss"]
    metrics = pd.read_csv(out / "metrics.csv")[columns]
    metrics.insert(1, "numerics", summary["record_key"]["numerics"])
    return metrics


if __name__ == "__main__":  # regenerate the committed numbers
    import tempfile

    from fedsq import data

    with tempfile.TemporaryDirectory() as tmp:
        data.prepare("digits", Path(tmp) / "data")
        golden_metrics(Path(tmp) / "data", f"sqlite:///{tmp}/mlflow.db", Path(tmp) / "run").to_csv(GOLDEN, index=False)
    print(f"wrote {GOLDEN}")

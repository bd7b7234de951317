"""Exact resume: a run interrupted after a checkpoint and started again ends as if never stopped;
a checkpoint never outlives what produced it (a finished run, other inputs, other code)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from fedsq import checkpoint, config, data, engine, models, partition, version
from fedsq.client_store import ClientStore

REPO = Path(__file__).resolve().parents[1]


def raw_cfg(digits_root, mlflow_uri, **extra):
    # scaffold + local BatchNorm: resume must also restore server state and on-disk client state
    return {
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "dirichlet", "num_clients": 10}, "clients_per_round": 2, "rounds": 2,
        "method": {"name": "scaffold"}, "bn": "local", "optimizer": {"lr": 0.05}, "device": "cpu",
        "eval": {"drift_every": 0}, "paths": {"data": str(digits_root)}, "tracking": {"uri": mlflow_uri},
    } | extra


def assert_same_results(out_a: Path, out_b: Path):
    a, b = (pd.read_csv(out / "metrics.csv").drop(columns="wall_seconds") for out in (out_a, out_b))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa, sb = (json.loads((out / "summary.json").read_text()) for out in (out_a, out_b))
    for s in (sa, sb):
        del s["wall_seconds"], s["mlflow_run_id"]
    assert sa == sb


def assert_one_value_per_round(mlflow_uri, run_id, rounds):
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("val_acc", "test_acc", "lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(0 if key != "lr" else 1, rounds + 1)), key


def interrupt_at_round(round: int, monkeypatch) -> None:
    train_round = engine.Simulation.train_round

    def interrupted(self, r, *args):
        if r == round:
            raise KeyboardInterrupt
        return train_round(self, r, *args)

    monkeypatch.setattr(engine.Simulation, "train_round", interrupted)


def scramble_global_generators_before_each_round(monkeypatch) -> None:
    """Python's, numpy's and torch's global generators somewhere else at every round's start:
    where a resumed run finds them (the checkpoint keeps no generator state)."""
    train_round = engine.Simulation.train_round

    def scrambled(self, r, *args):
        random.seed(1000 + r)
        np.random.seed(1000 + r)
        torch.manual_seed(1000 + r)
        return train_round(self, r, *args)

    monkeypatch.setattr(engine.Simulation, "train_round", scrambled)


def test_interrupted_run_resumes_into_the_same_mlflow_run_with_identical_results(
    digits_root, mlflow_uri, tmp_path, monkeypatch
):
    cfg = config.load(raw_cfg(digits_root, mlflow_uri))
    engine.run(cfg, tmp_path / "straight")

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_at_round(2, patch)
        engine.run(cfg, tmp_path / "resumed")
    saved = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert saved.round == 1 and not (tmp_path / "resumed" / "summary.json").exists()
    assert MlflowClient(mlflow_uri).get_run(saved.mlflow_run_id).info.status == "KILLED"

    with monkeypatch.context() as patch:
        scramble_global_generators_before_each_round(patch)
        summary = engine.run(cfg, tmp_path / "resumed")
    assert summary["mlflow_run_id"] == saved.mlflow_run_id
    assert_one_value_per_round(mlflow_uri, summary["mlflow_run_id"], rounds=2)
    assert_same_results(tmp_path / "straight", tmp_path / "resumed")

    # the two kinds of per-client state are kept apart on disk
    stores = tmp_path / "resumed" / "client_state"
    client = int(next((stores / "batchnorm").glob("client*")).name.removeprefix("client"))
    bn_state = ClientStore(stores / "batchnorm").get(client, before_round=99)
    variates = ClientStore(stores / "method").get(client, before_round=99)
    assert "bn1.running_var" in bn_state and "fc.weight" not in bn_state
    assert "fc.weight" in variates and "bn1.running_var" not in variates


def test_a_finished_run_retires_its_checkpoint_so_a_forced_rerun_starts_from_round_0(
    digits_root, mlflow_uri, tmp_path
):
    cfg = config.load(raw_cfg(digits_root, mlflow_uri))
    first = engine.run(cfg, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()

    # Stopped between writing summary.json and retiring the checkpoint: the next start retires it.
    checkpoint.save(tmp_path / "checkpoint.pt", run_state(round=2))
    assert engine.run(cfg, tmp_path) == first
    assert not (tmp_path / "checkpoint.pt").exists()

    (tmp_path / "summary.json").unlink()  # what `snakemake --forcerun` does first
    second = engine.run(cfg, tmp_path)
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    assert_one_value_per_round(mlflow_uri, second["mlflow_run_id"], rounds=2)  # every round trained again
    for s in (first, second):
        del s["wall_seconds"], s["mlflow_run_id"]
    assert second == first


def run_state(**fields) -> checkpoint.RunState:
    empty = {"round": 0, "global_state": {}, "strategy": {}, "metrics": [], "samples_trained": 0,
             "wall_seconds": 0.0, "fingerprint": {}}
    return checkpoint.RunState(**empty | fields)


def test_a_checkpoint_of_an_older_shape_is_set_aside(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"round": 3, "model": {"w": torch.zeros(2)}}, path)  # no fingerprint, another layout
    with pytest.warns(UserWarning, match=r"made from other inputs \(changed: config"):
        assert engine._resume_point(path, {"config": {"seed": 0}}) is None
    [stale] = tmp_path.glob("checkpoint.stale-*.pt")
    assert torch.load(stale, weights_only=True)["round"] == 3 and not path.exists()


def test_a_checkpoint_of_another_config_is_set_aside_and_old_client_state_removed(digits_root, mlflow_uri, tmp_path):
    cfg = config.load(raw_cfg(digits_root, mlflow_uri, rounds=0))
    old = run_state(fingerprint=engine._fingerprint(cfg | {"seed": 7}, 0.05), mlflow_run_id="old")
    checkpoint.save(tmp_path / "checkpoint.pt", old)
    leftover = tmp_path / "client_state" / "method" / "client3" / "round1.pt"
    leftover.parent.mkdir(parents=True)
    torch.save({}, leftover)
    (tmp_path / "metrics.csv").write_text("round\n0\n1\n")

    with pytest.warns(UserWarning, match=r"checkpoint.pt was made from other inputs \(changed: config.seed\)"):
        summary = engine.run(cfg, tmp_path)
    [stale] = tmp_path.glob("checkpoint.stale-*.pt")
    assert checkpoint.load(stale) == old
    assert summary["mlflow_run_id"] != "old" and summary["rounds"] == 0
    assert not leftover.exists()
    assert list(pd.read_csv(tmp_path / "metrics.csv")["round"]) == [0]


def write_calibration(path: Path, lr: float) -> None:
    path.write_text(json.dumps({"method": "scaffold", "lr": lr, "mode": "federated"}))


def write_partition(folder: Path, digits_root: Path, seed: int) -> None:
    labels = data.load("digits", digits_root).train.y
    split = {"scheme": "dirichlet", "num_clients": 10, "alpha": 0.5, "seed": seed, "min_size": 2}
    partition.write(partition.make(labels, split), labels, folder, num_classes=10)


def write_weights(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(models.build("resnet18", models.IMAGENET_CLASSES, None).state_dict(), path)


@pytest.mark.parametrize("change", ["calibration", "partition", "weights", "code version"])
def test_a_checkpoint_of_other_inputs_is_set_aside_and_the_run_starts_over(
    change, digits_root, mlflow_uri, tmp_path, monkeypatch
):
    write_calibration(tmp_path / "calibration.json", lr=0.05)
    write_partition(tmp_path / "partition", digits_root, seed=0)
    write_weights(tmp_path / "weights.pt", seed=0)
    cfg = config.load(raw_cfg(
        digits_root, mlflow_uri, weights=str(tmp_path / "weights.pt"), optimizer={"lr": "calibrated"},
        calibration=str(tmp_path / "calibration.json"),
        paths={"data": str(digits_root), "partition": str(tmp_path / "partition")},
    ))
    out = tmp_path / "run"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_at_round(2, patch)
        engine.run(cfg, out)
    old, old_rows = checkpoint.load(out / "checkpoint.pt"), pd.read_csv(out / "metrics.csv")
    assert old.round == 1

    if change == "calibration":  # a new calibration at the same path
        write_calibration(tmp_path / "calibration.json", lr=0.1)
    elif change == "partition":
        write_partition(tmp_path / "partition", digits_root, seed=1)
    elif change == "weights":
        write_weights(tmp_path / "weights.pt", seed=1)
    else:  # a new commit
        monkeypatch.setattr(version, "code_version", lambda: "0.1.0+a-new-commit")
    with pytest.warns(UserWarning, match=rf"changed: [^)]*{change}[^)]*\); set aside as checkpoint.stale-"):
        summary = engine.run(cfg, out)

    [stale] = out.glob("checkpoint.stale-*.pt")
    assert checkpoint.load(stale).mlflow_run_id == old.mlflow_run_id != summary["mlflow_run_id"]
    assert_one_value_per_round(mlflow_uri, summary["mlflow_run_id"], rounds=2)  # from round 0, in a new run
    rows = pd.read_csv(out / "metrics.csv")
    assert list(rows["round"]) == [0, 1, 2]
    # Round 1 trained again: from the new inputs, or (same inputs, new code) to the same figures.
    assert (rows.loc[1, "train_loss"] == old_rows.loc[1, "train_loss"]) == (change == "code version")
    if change == "calibration":
        assert rows.loc[1, "lr"] == summary["lr"] == 0.1


def fedsq_run(config_path: Path, out: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedsq", "run", "--config", str(config_path), "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for_checkpoint(out: Path, round: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"run ended before round {round} was checkpointed: {process.stderr.read()}"
        saved = checkpoint.load(out / "checkpoint.pt")
        if saved is not None and saved.round >= round:
            return
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint of round {round} in {out}")


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(digits_root, mlflow_uri, tmp_path):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw_cfg(digits_root, mlflow_uri, rounds=3)))

    killed = fedsq_run(config_path, tmp_path / "killed")
    wait_for_checkpoint(tmp_path / "killed", 1, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    run_id = checkpoint.load(tmp_path / "killed" / "checkpoint.pt").mlflow_run_id

    for out in ("killed", "straight"):  # the rerun, and a run never interrupted, in like processes
        process = fedsq_run(config_path, tmp_path / out)
        assert process.wait() == 0, process.stderr.read()
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["mlflow_run_id"] == run_id
    assert_one_value_per_round(mlflow_uri, run_id, rounds=3)
    assert_same_results(tmp_path / "straight", tmp_path / "killed")
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()  # retired with the finished run


@pytest.mark.slow
def test_sigterm_marks_the_mlflow_run_killed_and_keeps_the_checkpoint(digits_root, mlflow_uri, tmp_path):
    # SLURM's scancel, time limit and preemption all send SIGTERM, to every process of the job,
    # before SIGKILL: the run must unwind and mark its MLflow run KILLED in that time.
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw_cfg(digits_root, mlflow_uri, rounds=50)))
    process = fedsq_run(config_path, tmp_path)
    wait_for_checkpoint(tmp_path, 0, process)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert "interrupted (SIGTERM)" in process.stderr.read()
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved is not None and not (tmp_path / "summary.json").exists()
    assert MlflowClient(mlflow_uri).get_run(saved.mlflow_run_id).info.status == "KILLED"

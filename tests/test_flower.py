"""fedsq in Flower's simulation engine: the same global parameters and validation accuracy per
round as ``fedsq run`` on the same config, and only FedSQ's quantitative copy in the messages."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from fedsq import checkpoint, config, engine, flower

CLIENTS = 3


def write_cfg(folder: Path, digits_root, mlflow_uri, method: str) -> Path:
    raw = {
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": CLIENTS}, "rounds": 2,
        "method": {"name": method}, "optimizer": {"lr": 0.05}, "device": "cpu",
        "eval": {"drift_every": 0}, "paths": {"data": str(digits_root)},
        "tracking": {"uri": mlflow_uri, "experiment": f"flower-{method}"},
    }
    path = folder / f"{method}.yaml"
    path.write_text(json.dumps(config.load(raw)))  # JSON is YAML
    return path


@pytest.fixture
def global_states(monkeypatch):
    """Every round's global state as checkpointed, by run folder name: the engine and the
    Flower ServerApp (a thread of this process in Flower's simulation) both write them."""
    states: dict[str, list[dict]] = {}
    save = checkpoint.save

    def recording(path, state):
        states.setdefault(Path(path).parent.name, []).append({k: v.clone() for k, v in state.global_state.items()})
        save(path, state)

    monkeypatch.setattr(checkpoint, "save", recording)
    return states


@pytest.fixture
def messages(monkeypatch):
    """The content of every message the ServerApp sent and received."""
    seen: list = []
    exchange = flower.FederatedSimulation._exchange

    def recording(self, message_type, node_ids, content, *args, **kwargs):
        replies = exchange(self, message_type, node_ids, content, *args, **kwargs)
        seen.append(content)
        seen.extend(replies.values())
        return replies

    monkeypatch.setattr(flower.FederatedSimulation, "_exchange", recording)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "fedsq"])
def test_flower_simulation_ends_where_fedsq_run_does(method, digits_root, mlflow_uri, tmp_path, global_states,
                                                      messages):
    cfg_path = write_cfg(tmp_path, digits_root, mlflow_uri, method)
    engine.run(config.load(cfg_path), tmp_path / "engine")
    flower.simulate(cfg_path, tmp_path / "flower")

    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    ours, theirs = global_states["engine"], global_states["flower"]
    assert len(ours) == len(theirs) == 3  # rounds 0, 1, 2
    for r, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys()
        for key in a:
            diff = (a[key].double() - b[key].double()).abs().max().item()
            assert diff <= 1e-5, f"round {r}, {key}: max abs difference {diff}"
    assert any(not torch.equal(ours[0][k], ours[2][k]) for k in ours[0])  # it trained
    engine_metrics, flower_metrics = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("engine", "flower"))
    assert engine_metrics["val_acc"].tolist() == flower_metrics["val_acc"].tolist()
    assert engine_metrics["samples_trained"].tolist() == flower_metrics["samples_trained"].tolist()
    assert engine_metrics["train_loss"].iloc[1:].tolist() == pytest.approx(flower_metrics["train_loss"].iloc[1:].tolist(), rel=1e-5)

    # recorded as `fedsq run` records: one MLflow run, finished, with every round and the artifacts
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name(f"flower-{method}").experiment_id],
                               f"attributes.run_id = '{summary['mlflow_run_id']}'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0, 1, 2]
    assert (tmp_path / "flower" / "partition" / "class_counts.csv").exists()
    assert 0 <= summary["client_acc"]["min"] <= summary["client_acc"]["max"] <= 1

    # What travelled: the global state out, each client's state back; for FedSQ the
    # quantitative copy only (a DualCopy's state_dict), never the structural copy.
    arrays = [record for content in messages for record in content.array_records.values()]
    assert arrays and all(set(record) == set(ours[0]) for record in arrays)
    if method == "fedsq":
        assert all(key.startswith("quantitative.") for key in ours[0])

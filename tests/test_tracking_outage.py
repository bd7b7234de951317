"""A tracking server that goes away mid-run: training goes on with metrics.csv as the record,
one warning, and the same MLflow run catches up, when the server is back or by `fedsq tracking sync`."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from fedsq import cli, config, engine

pytestmark = pytest.mark.slow  # a real `mlflow server`: tens of seconds to start on a busy machine


class Server:
    """`mlflow server` on a SQLite store and a fixed port, stopped and started again at will."""

    def __init__(self, folder: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.folder, self.uri, self.process = folder, f"http://127.0.0.1:{port}", None
        self.command = [
            str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"),
        ]

    def start(self, timeout: float = 300) -> None:
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.folder / "server.log", "a") as log:  # its own session: stop() ends all it started
            self.process = subprocess.Popen(self.command, cwd=self.folder, env=env, stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"mlflow server not up after {timeout} s"
                time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)
        deadline = time.monotonic() + 30
        try:  # its workers (same process group) too
            while time.monotonic() < deadline:
                os.killpg(self.process.pid, 0)
                time.sleep(0.1)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


def run_with_outage(server, cfg, out, monkeypatch, stop_at: int, start_at: int | None = None) -> tuple[dict, list]:
    """Run ``cfg``, stopping the server as round ``stop_at`` starts and starting it again as
    ``start_at`` does; training and evaluation are stubbed (this is about the records)."""

    def train_round(self, r, lr, global_state, after_client):
        if r == stop_at:
            # The outage starts once the run is in MLflow: rounds are stubbed, and on a busy
            # machine the writer thread may still be importing MLflow at round 2.
            wait_for_a_run(server, cfg["tracking"]["experiment"])
            server.stop()
        if r == start_at:
            server.start()
        return global_state, 1.0 / r, 10

    monkeypatch.setattr(engine.Simulation, "train_round", train_round)
    monkeypatch.setattr(engine.Simulation, "evaluate_images", lambda self, split: (0.5, 1.0, "1"))
    monkeypatch.setattr(engine.Simulation, "client_accuracy", lambda self: np.full(10, 0.5))
    with pytest.warns(UserWarning) as warned:
        summary = engine.run(cfg, out)
    return summary, [str(w.message) for w in warned if str(w.message).startswith(("MLflow store", "MLflow run"))]


def wait_for_a_run(server, experiment, timeout: float = 300) -> None:
    client, deadline = MlflowClient(server.uri), time.monotonic() + timeout
    while True:
        found = client.get_experiment_by_name(experiment)
        if found and client.search_runs([found.experiment_id]):
            return
        assert time.monotonic() < deadline, f"no MLflow run in {experiment!r} after {timeout} s"
        time.sleep(0.2)


def make_cfg(digits_root, server, experiment, rounds):
    return config.load({
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "iid", "num_clients": 10}, "clients_per_round": 1, "rounds": rounds,
        "optimizer": {"lr": 0.05}, "device": "cpu", "eval": {"drift_every": 0},
        "paths": {"data": str(digits_root)}, "tracking": {"uri": server.uri, "experiment": experiment},
    })


def history(client, run_id):
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def assert_complete(client, run_id, out, experiment):
    """Every round of metrics.csv once in MLflow, the summary, the artifacts; one FINISHED run."""
    rows = pd.read_csv(out / "metrics.csv")
    logged = history(client, run_id)
    for key in ("val_acc", "train_loss", "lr", "samples_trained"):
        assert logged[key] == [(r, v) for r, v in zip(rows["round"], rows[key]) if pd.notna(v)], key
    assert "summary.best_val_acc" in logged
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.csv", "summary.json", "partition"}
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"


def test_a_run_trains_through_an_outage_and_mlflow_catches_up_when_the_server_is_back(
    server, digits_root, tmp_path, monkeypatch
):
    cfg = make_cfg(digits_root, server, "outage", rounds=4)
    summary, warned = run_with_outage(server, cfg, tmp_path, monkeypatch, stop_at=2, start_at=4)
    assert len(warned) == 1 and "did not answer" in warned[0]  # once, and the end caught up
    assert list(pd.read_csv(tmp_path / "metrics.csv")["round"]) == [0, 1, 2, 3, 4]
    assert_complete(MlflowClient(server.uri), summary["mlflow_run_id"], tmp_path, "outage")


def test_a_run_ends_during_an_outage_and_tracking_sync_replays_it_once(
    server, digits_root, tmp_path, monkeypatch, capsys
):
    cfg = make_cfg(digits_root, server, "sync", rounds=2)
    summary, warned = run_with_outage(server, cfg, tmp_path, monkeypatch, stop_at=2)
    assert len(warned) == 2 and "did not answer" in warned[0] and f"fedsq tracking sync {tmp_path}" in warned[1]
    assert (tmp_path / "summary.json").exists()

    server.start()
    client, run_id = MlflowClient(server.uri), summary["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"
    assert cli.main(["tracking", "sync", str(tmp_path)]) == 0
    assert f"MLflow run {run_id} on {server.uri} holds every record" in capsys.readouterr().out
    assert_complete(client, run_id, tmp_path, "sync")
    synced = history(client, run_id)
    assert cli.main(["tracking", "sync", str(tmp_path)]) == 0  # idempotent: nothing logged twice
    assert history(client, run_id) == synced

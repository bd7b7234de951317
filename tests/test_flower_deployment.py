"""fedsq in a real Flower deployment on 127.0.0.1: a SuperLink, two SuperNodes each on its own
data file, `flwr run` of FedSQ; then a SuperNode killed mid-round fails the run loudly."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow import MlflowClient

from fedsq import config, data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WAIT_S = 240  # the longest any step may take before the test fails (never hangs)
POLL_S = 5  # between `flwr list` calls: each is a Python start, a CPU second taken from the nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """Processes of a local Flower deployment, each stopped at the end with everything it started
    (the SuperLink and SuperNodes start their SuperExec in a session of its own)."""

    def __init__(self, folder: Path):
        self.folder, self.processes = folder, {}
        # One torch thread per process: two SuperNodes share the 2 cores.
        self.env = os.environ | {"FLWR_HOME": str(folder / "flwr-home"), "PATH": f"{BIN}:{os.environ['PATH']}",
                                 "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def start(self, name: str, *args: str) -> None:
        with open(self.folder / f"{name}.log", "w") as log:
            self.processes[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                    start_new_session=True)

    def kill(self, name: str) -> None:
        """SIGKILL the process and every process under it, as a machine that goes away would."""
        root = psutil.Process(self.processes.pop(name).pid)
        tree = [root, *root.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=10)

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def wait_listening(self, name: str, port: int) -> None:
        """Until ``name`` accepts connections on ``port``: a loaded machine takes seconds to start it."""
        deadline = time.monotonic() + WAIT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name} not listening on {port} after {WAIT_S} s"
            time.sleep(0.5)

    def flwr(self, *args: str) -> str:
        done = subprocess.run(["flwr", *args], capture_output=True, text=True, env=self.env, cwd=REPO, timeout=60)
        assert done.returncode == 0, f"flwr {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop()


def node_data(digits_root, folder: Path) -> list[Path]:
    """Each organisation's own data, an npz file: 200 of digits' training images each."""
    train = data.load("digits", digits_root).train
    files = []
    for node, own in enumerate(np.split(np.arange(400), 2)):
        files.append(folder / f"org{node}.npz")
        np.savez(files[-1], x_train=np.asarray(train.x[own]), y_train=train.y[own])
    return files


def wait_for(condition, what: str, federation: Federation, run_id: str, every_s: float = 1.0):
    deadline = time.monotonic() + WAIT_S
    while not (result := condition()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{federation.log(n)[-2000:]}" for n in ("superlink", "org0", "org1"))
            pytest.fail(f"timed out waiting for {what}\n--- run {run_id}\n{federation.flwr('log', run_id)[-3000:]}\n{logs}")
        time.sleep(every_s)
    return result


@pytest.mark.slow
def test_deployment_runs_fedsq_on_each_nodes_data_and_a_lost_node_fails_the_run(digits_root, tmp_path,
                                                                                federation):
    superlink, org0, org1 = free_port(), free_port(), free_port()
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = {
        # The server's own held-out data (validation and test); training data stays on the nodes.
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "iid", "num_clients": 2}, "rounds": 2, "method": {"name": "fedsq"},
        "optimizer": {"lr": 0.05}, "device": "cpu", "eval": {"drift_every": 0}, "paths": {"data": str(digits_root)},
        "tracking": {"uri": mlflow_uri, "experiment": "deployment"},
    }
    cfg_path = tmp_path / "fedsq.yaml"
    cfg_path.write_text(json.dumps(config.load(raw)))

    # fedsq is installed here: nothing for the SuperLink to install at run time.
    federation.start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                     "--host", "127.0.0.1", "--port", str(superlink))
    federation.wait_listening("superlink", superlink)
    for node, (own, port) in enumerate(zip(node_data(digits_root, tmp_path), (org0, org1))):
        federation.start(f"org{node}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{superlink}",
                         "--port", str(port), "--node-config",
                         f"partition-id={node} dataset='npz:{own}' data-root='{tmp_path / f'org{node}-data'}' "
                         f"state-dir='{tmp_path / f'org{node}-state'}'")
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)  # FLWR_HOME: the SuperLink may have made it already
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
        f'address = "127.0.0.1:{superlink}"\ninsecure = true\n')

    def submit(out: Path, *extra: str) -> str:
        run_config = " ".join([f"config='{cfg_path}'", f"out='{out}'", "connect-timeout=120.0", *extra])
        printed = federation.flwr("run", "flower", "deployment", "--run-config", run_config, "--format", "json")
        return str(json.loads(printed)["run-id"])

    def status(run_id: str) -> str:
        [run] = json.loads(federation.flwr("list", "--run-id", run_id, "--format", "json"))["runs"]
        return run["status"]

    # A whole run: finishes, with the summary and one MLflow run, as `fedsq run` leaves them.
    run_id = submit(tmp_path / "run", "round-timeout=300.0")
    final = wait_for(lambda: (s := status(run_id)).startswith("finished") and s, "the run to finish", federation,
                     run_id, every_s=POLL_S)
    assert final == "finished:completed", federation.flwr("log", run_id)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # each node trained on its own file, prepared on its side (its test and validation carved out)
    own = [json.loads((tmp_path / f"org{node}-data" / f"org{node}" / "meta.json").read_text())["sizes"]["train"]
           for node in range(2)]
    assert summary["rounds"] == 2 and summary["samples_trained"] == 2 * sum(own)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("deployment").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]] and runs[0].info.status == "FINISHED"

    # A node lost mid-round: the round, and the run, fail loudly instead of waiting for it.
    run_id = submit(tmp_path / "lost", "round-timeout=20.0")
    wait_for(lambda: (tmp_path / "lost" / "metrics.csv").exists() or status(run_id).startswith("finished"),
             "round 0's evaluation", federation, run_id, every_s=2)
    assert (tmp_path / "lost" / "metrics.csv").exists(), federation.flwr("log", run_id)[-3000:]
    federation.kill("org1")
    final = wait_for(lambda: (s := status(run_id)).startswith("finished") and s, "the run to end", federation,
                     run_id, every_s=POLL_S)
    assert final == "finished:failed"
    assert re.search(r"FederationError: round 1: [01] of 2 nodes replied, 2 needed; .*node \d+", federation.flwr("log", run_id))
    assert not (tmp_path / "lost" / "summary.json").exists()
    runs = client.search_runs([client.get_experiment_by_name("deployment").experiment_id], order_by=["start_time"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]

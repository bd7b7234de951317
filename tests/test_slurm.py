"""The SLURM profile on a real single-node SLURM cluster (scripts/local-slurm.sh).

The CI grid (.test/config) runs once end to end through `profiles/slurm`, with the account and
partition of the local cluster layered on top by `profiles/slurm-test`; one of its FL jobs is
cancelled with scancel after its first round and must resume from its checkpoint. Every Snakemake
call is bounded: when status queries fail, Snakemake waits forever (and ignores SIGTERM), so each
call runs in its own process group, killed on timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

# About 5 minutes on 2 busy cores (17 under heavy load); the timeouts only stop hangs.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "local-slurm.sh"
CI_CONFIG = REPO / ".test" / "config" / "config.yaml"
SNAKEMAKE = [
    sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
    "--profile", str(REPO / "profiles" / "slurm"), "--profile", str(REPO / "profiles" / "slurm-test"),
]  # fmt: skip
# The plugin's line for each submission, e.g.
# "Job 7 has been submitted with SLURM jobid 12 (log: /w/.snakemake/slurm_logs/rule_fl/.../12.log)."
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (.+/rule_(\w+)/.+?)\)\.$", re.M)


def _first_grid_point() -> dict:
    cfg = yaml.safe_load(CI_CONFIG.read_text())
    keys = {"dataset": "datasets", "backbone": "backbones", "split": "splits", "method": "methods", "seed": "seeds"}
    return {wildcard: next(iter(cfg[key])) for wildcard, key in keys.items()}


# A calibrated run of the CI grid that the grid fixture cancels with scancel mid-run, as a
# preemption would; the folder where the plugin puts its SLURM logs (rule_<rule>/<wildcards>/);
# and the calibration it needs.
_POINT = _first_grid_point()
CANCELLED_RUN = Path("results/runs/{dataset}/{backbone}/{split}/{method}/seed{seed}".format(**_POINT))
CANCELLED_LOGS = "/rule_fl/runs_{dataset}_{backbone}_{split}_{method}_{seed}/".format(**_POINT)
CALIBRATION = Path("results/calibration/{dataset}/{backbone}/iid/bn-pooled/{method}.json".format(**_POINT))


class Cluster:
    def __init__(self, state: Path, start_seconds: float):
        self.state = state
        self.start_seconds = start_seconds

    def job_states(self) -> dict[str, str]:
        """SLURM job id -> final state of every finished job, from the job-completion log."""
        log = self.state / "jobcomp.log"
        return dict(re.findall(r"JobId=(\d+) .*?JobState=(\S+)", log.read_text() if log.exists() else ""))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages and starts daemons)")
    if not shutil.which("sinfo") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    state = tmp_path_factory.mktemp("local-slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state)}
    t0 = time.monotonic()
    # On a fresh machine this installs the packages first (about 10 s from a Debian mirror).
    subprocess.run([CLUSTER_SCRIPT, "start"], env=env, check=True, timeout=600)
    yield Cluster(state, time.monotonic() - t0)
    subprocess.run([CLUSTER_SCRIPT, "stop"], env=env, check=True, timeout=120)
    status = subprocess.run([CLUSTER_SCRIPT, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert status.returncode != 0, f"cluster still running after stop:\n{status.stdout}"


@contextlib.contextmanager
def running_snakemake(args: list[str], workdir: Path, log: Path, config: Path = CI_CONFIG):
    """Snakemake in its own process group, killed with everything it started if still running at exit."""
    # Jobs inherit this environment (sbatch --export=ALL): this interpreter and fedsq from the repo.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*SNAKEMAKE, "--configfile", str(config), "--directory", str(workdir), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # SIGTERM first, so that it cancels its SLURM jobs; it may ignore it.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Snakemake's log once it exits; fails after `timeout` seconds."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"snakemake still running after {timeout:.0f} s; log tail:\n{log.read_text()[-3000:]}")
    return log.read_text()


def snakemake(args: list[str], workdir: Path, timeout: float, config: Path = CI_CONFIG) -> tuple[int, str]:
    log = workdir / f"snakemake-{time.monotonic_ns()}.log"
    with running_snakemake(args, workdir, log, config) as proc:
        out = finish(proc, log, timeout)
    return proc.returncode, out


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str):
    """The first value of predicate() that is not None, polled while Snakemake runs."""
    deadline = time.monotonic() + timeout
    while (value := predicate()) is None:
        if proc.poll() is not None:
            pytest.fail(f"snakemake exited before {what}; log tail:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s; log tail:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return value


def mlflow_client(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


def assert_finished_mlflow_run(client, summary: dict, rounds: int):
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(steps) == list(range(rounds + 1)), f"val_acc steps {steps}"


def metrics_rows(run_dir: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(run_dir / "metrics.csv")  # rewritten atomically after every round
    except FileNotFoundError:
        return None


def checkpoint_after_round_one(run_dir: Path) -> dict | None:
    rows = metrics_rows(run_dir)
    if rows is None or len(rows) < 2:  # round 0 is the evaluation before training
        return None
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # replaced atomically
    return saved if saved["round"] >= 1 else None


def slurm_ids(log: str, logs_folder: str) -> list[str]:
    """SLURM ids of the jobs submitted for one rule and wildcards, in submission order."""
    return [slurm_id for slurm_id, path, _ in SUBMITTED.findall(log) if logs_folder in path]


@dataclass
class GridRun:
    workdir: Path
    returncode: int
    log: str
    cancelled: dict  # the checkpoint CANCELLED_RUN had when its job was cancelled
    rows_before: pd.DataFrame  # its metrics.csv rows up to that checkpoint's round
    cancelled_id: str


@pytest.fixture(scope="module")
def grid(cluster, tmp_path_factory) -> GridRun:
    """The CI grid, run once through the SLURM profile, with CANCELLED_RUN's job cancelled after round 1."""
    workdir = tmp_path_factory.mktemp("grid")
    log = workdir / "snakemake.log"
    run_dir = workdir / CANCELLED_RUN
    with running_snakemake([], workdir, log) as proc:
        slurm_id = wait_for(lambda: slurm_ids(log.read_text(), CANCELLED_LOGS) or None, proc, log, 900, "fl job")[0]
        saved = wait_for(lambda: checkpoint_after_round_one(run_dir), proc, log, 900, "checkpoint after round 1")
        rows = metrics_rows(run_dir).query(f"round <= {saved['round']}")
        subprocess.run(["scancel", slurm_id], check=True, timeout=30)
        out = finish(proc, log, timeout=1200)
    return GridRun(workdir, proc.returncode, out, saved, rows, slurm_id)


def test_ci_grid_runs_every_job_on_slurm(cluster, grid, capsys):
    assert grid.returncode == 0, grid.log[-3000:]
    submitted = SUBMITTED.findall(grid.log)
    # Snakemake prints "rule X:" for a job it hands to SLURM and "localrule X:" for one it runs itself.
    cluster_jobs = re.findall(r"^rule (\w+):$", grid.log, re.M)
    local_jobs = re.findall(r"^localrule (\w+):$", grid.log, re.M)
    assert sorted(rule for _, _, rule in submitted) == sorted(cluster_jobs)
    assert {"calibrate", "fl"} <= set(cluster_jobs)
    assert "data_prepare" in local_jobs  # downloads stay on the submit host, which has the internet
    states = cluster.job_states()
    for slurm_id, slurm_log, _ in submitted:
        assert Path(slurm_log).is_file(), f"no SLURM log {slurm_log}"
        expected = "CANCELLED" if slurm_id == grid.cancelled_id else "COMPLETED"
        assert states.get(slurm_id) == expected, f"SLURM job {slurm_id}: {states.get(slurm_id)}"

    # Every output is there and up to date, the report included.
    rc, again = snakemake(["--dry-run"], grid.workdir, timeout=120)
    assert rc == 0 and "Nothing to be done" in again, again[-3000:]
    runs = sorted(grid.workdir.glob("results/*/*/*/*/*/seed*/summary.json"))
    assert len(runs) == cluster_jobs.count("fl") - 1  # the cancelled run was submitted twice
    client = mlflow_client(grid.workdir)
    for path in runs:
        summary = json.loads(path.read_text())
        assert_finished_mlflow_run(client, summary, summary["rounds"])
    with capsys.disabled():  # the figures for the CI log
        print(
            f"\nSLURM: cluster up in {cluster.start_seconds:.1f} s; CI grid: {len(submitted)} jobs submitted "
            f"({', '.join(f'{rule}:{i}' for i, _, rule in submitted)}), each with a SLURM log, all COMPLETED "
            f"but {grid.cancelled_id} (cancelled); {len(runs)} run summaries, each with a FINISHED MLflow run"
        )


def test_run_cancelled_by_slurm_resumes_from_its_checkpoint(cluster, grid, capsys):
    """scancel mid-run: the profile's retry resubmits the job, which continues from the last round."""
    assert f"SLURM-job '{grid.cancelled_id}' failed, SLURM status is: 'CANCELLED'" in grid.log
    first, retry = slurm_ids(grid.log, CANCELLED_LOGS)
    assert first == grid.cancelled_id
    assert cluster.job_states()[retry] == "COMPLETED"
    run_dir = grid.workdir / CANCELLED_RUN
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    assert grid.cancelled["round"] < rounds, "the job finished before it was cancelled"
    after = metrics_rows(run_dir)
    assert list(after["round"]) == list(range(rounds + 1))
    # Rounds checkpointed before the kill keep their rows, wall clock included: resumed, not redone.
    pd.testing.assert_frame_equal(after.iloc[: len(grid.rows_before)], grid.rows_before)
    assert summary["mlflow_run_id"] == grid.cancelled["mlflow_run_id"]
    assert_finished_mlflow_run(mlflow_client(grid.workdir), summary, rounds)
    with capsys.disabled():
        print(
            f"\nSLURM: fl job {first} cancelled after round {grid.cancelled['round']} of {rounds}; retry job "
            f"{retry} resumed from that checkpoint in the same MLflow run {summary['mlflow_run_id']}"
        )


def test_gpu_request_on_a_gpu_less_node_fails_fast(cluster, grid):
    config = yaml.safe_load(CI_CONFIG.read_text())
    config["resources"]["gpu"] = 1  # as in the paper grid
    config_path = grid.workdir / "gpu.yaml"
    config_path.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    # Everything is done but the calibration, forced: the one job this run submits asks for a GPU.
    rc, out = snakemake(["--forcerun", "calibrate", "--", str(CALIBRATION)], grid.workdir, 120, config_path)
    assert rc != 0
    assert "--gpus=1" in out
    assert "Invalid generic resource (gres) specification" in out
    assert time.monotonic() - t0 < 90

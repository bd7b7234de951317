"""The SLURM profile on a real single-node SLURM cluster (scripts/local-slurm.sh).

Every Snakemake call is bounded: a stuck status query makes Snakemake wait forever (and it
ignores SIGTERM then), so each call runs in its own process group that is killed on timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "local-slurm.sh"
SMOKE = REPO / "tests" / "data" / "slurm_smoke" / "Snakefile"
TEST_PROFILE = REPO / "profiles" / "slurm-test"
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$", re.M)


class Cluster:
    def __init__(self, state: Path, start_seconds: float):
        self.state = state
        self.start_seconds = start_seconds

    def completed_jobs(self) -> dict[str, str]:
        """SLURM job id -> final state, from the controller's job-completion log."""
        log = self.state / "jobcomp.log"
        text = log.read_text() if log.exists() else ""
        return dict(re.findall(r"JobId=(\d+) .*?JobState=(\S+)", text))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages and starts daemons)")
    if not shutil.which("sinfo") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    state = tmp_path_factory.mktemp("local-slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state)}
    t0 = time.monotonic()
    # A fresh machine installs the packages first (about 10 s from a Debian mirror).
    subprocess.run([CLUSTER_SCRIPT, "start"], env=env, check=True, timeout=600)
    yield Cluster(state, time.monotonic() - t0)
    subprocess.run([CLUSTER_SCRIPT, "stop"], env=env, check=True, timeout=120)
    status = subprocess.run([CLUSTER_SCRIPT, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert status.returncode != 0, f"cluster still running after stop:\n{status.stdout}"


def snakemake_env() -> dict[str, str]:
    # Jobs inherit this environment (sbatch --export=ALL): the venv's python and fedsq from the repo.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start_snakemake(args: list[str], workdir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(workdir), *args]
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=snakemake_env(), start_new_session=True
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for Snakemake; on timeout kill its whole process group and fail with its log."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"snakemake still running after {timeout:.0f} s; log tail:\n{log.read_text()[-3000:]}")
    return log.read_text()


def snakemake(args: list[str], workdir: Path, timeout: float) -> tuple[int, str]:
    log = workdir / f"snakemake-{time.monotonic_ns()}.log"
    proc = start_snakemake(args, workdir, log)
    out = finish(proc, log, timeout)
    return proc.returncode, out


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


SMOKE_ARGS = ["-s", str(SMOKE), "--profile", str(TEST_PROFILE), "--jobs", "4"]


def test_every_job_runs_as_a_slurm_job(cluster, tmp_path, capsys):
    rc, out = snakemake(SMOKE_ARGS, tmp_path, timeout=120)
    assert rc == 0, out[-3000:]
    submitted = SUBMITTED.findall(out)
    cluster_jobs = re.findall(r"^rule (\w+):$", out, re.M)  # localrules print "localrule"
    assert len(submitted) == len(cluster_jobs) == 2, out[-3000:]
    completed = cluster.completed_jobs()
    for _, slurm_id, slurm_log in submitted:
        assert Path(slurm_log).is_file(), f"no SLURM log {slurm_log}"
        assert completed.get(slurm_id) == "COMPLETED", f"SLURM has no completed job {slurm_id}: {completed}"
    assert (tmp_path / "out" / "train" / "summary.txt").read_text() == "rounds=3\n"
    hello = (tmp_path / "out" / "hello.txt").read_text()
    assert hello.strip() in {f"SLURM_JOB_ID={i}" for _, i, _ in submitted}
    with capsys.disabled():  # the figures quoted in the CI log
        print(
            f"\nSLURM e2e: cluster started in {cluster.start_seconds:.1f} s; "
            f"{len(submitted)} jobs submitted, SLURM ids {[i for _, i, _ in submitted]}, all COMPLETED"
        )


def test_cancelled_job_resumes_from_its_checkpoint(cluster, tmp_path):
    args = [*SMOKE_ARGS, "--config", "rounds=20", "pause=0.5", "--", "out/train/summary.txt"]
    log = tmp_path / "killed.log"
    proc = start_snakemake(args, tmp_path, log)
    _, slurm_id, slurm_log = wait_for(lambda: SUBMITTED.findall(log.read_text()), 60, "the job's submission")[0]
    checkpoint = tmp_path / "out" / "train" / "checkpoint"
    wait_for(lambda: checkpoint.exists() and int(checkpoint.read_text()) >= 2, 60, "two finished rounds")
    subprocess.run(["scancel", slurm_id], check=True, timeout=30)
    out = finish(proc, log, timeout=60)
    assert proc.returncode != 0, out[-3000:]
    assert f"SLURM-job '{slurm_id}' failed, SLURM status is: 'CANCELLED'" in out
    killed_at = int(checkpoint.read_text())
    assert 2 <= killed_at < 20

    rc, out = snakemake([*args[:-2], "--rerun-incomplete", "--", "out/train/summary.txt"], tmp_path, 120)
    assert rc == 0, out[-3000:]
    assert "starts at round 0" in Path(slurm_log).read_text()
    (_, resumed_id, resumed_log), = SUBMITTED.findall(out)
    assert f"SLURM job {resumed_id} starts at round {killed_at}" in Path(resumed_log).read_text()
    assert (tmp_path / "out" / "train" / "summary.txt").read_text() == "rounds=20\n"


def test_gpu_request_on_a_gpu_less_node_fails_fast(cluster, tmp_path):
    t0 = time.monotonic()
    rc, out = snakemake([*SMOKE_ARGS, "out/gpu.txt"], tmp_path, timeout=60)
    assert rc != 0
    assert "Invalid generic resource (gres) specification" in out
    assert time.monotonic() - t0 < 30

"""GPU slots on CPU: real processes take slots of 4 fake GPUs x 2, never share one, and a job
killed with SIGKILL gives its slot back at once."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsq import gpu_slots

DEVICES = ["0", "1", "2", "3"]
PER_GPU = 2
ROOT = Path(__file__).resolve().parents[1]

# A job: says it is ready, waits for the go file (all start at once), takes a slot, records it, holds
# it, records the end.
JOB = """
import json, sys, time
from pathlib import Path
from fedsq import gpu_slots
lock_dir, record, go, hold_s = sys.argv[1:]
Path(record + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.01)
with gpu_slots.hold(%r, %d, Path(lock_dir), poll_s=0.05) as slot:
    entry = {"device": slot.device, "index": slot.index, "start": time.time()}
    Path(record).write_text(json.dumps(entry))
    time.sleep(float(hold_s))
    Path(record).write_text(json.dumps(entry | {"end": time.time()}))
""" % (DEVICES, PER_GPU)


def start_jobs(tmp_path, names, hold_s):
    go = tmp_path / "go"
    jobs = {
        name: subprocess.Popen(
            [sys.executable, "-c", JOB, str(tmp_path / "locks"), str(tmp_path / f"{name}.json"), str(go), str(hold_s)],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )
        for name in names
    }
    wait_for(tmp_path, [f"{name}.json.ready" for name in names])
    go.touch()
    return jobs


def wait_for(tmp_path, files, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not all((tmp_path / f).exists() for f in files):
        assert time.monotonic() < deadline, f"jobs did not write {files} in time"
        time.sleep(0.05)


def records(tmp_path, names):
    wait_for(tmp_path, [f"{n}.json" for n in names])
    return {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}


def test_jobs_started_at_once_never_share_a_slot_and_the_extra_ones_wait(tmp_path):
    jobs = start_jobs(tmp_path, [f"job{i}" for i in range(12)], hold_s=2.0)  # 12 jobs, 8 slots
    errors = {name: job.communicate(timeout=120)[1] for name, job in jobs.items()}
    assert all(job.returncode == 0 for job in jobs.values()), errors
    by_slot = {}
    for r in records(tmp_path, jobs).values():
        by_slot.setdefault((r["device"], r["index"]), []).append((r["start"], r["end"]))
    for slot, spans in by_slot.items():
        spans.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), f"slot {slot} shared"
    assert {device for device, _ in by_slot} == set(DEVICES) and len(by_slot) <= len(DEVICES) * PER_GPU
    waited = [name for name, err in errors.items() if "are taken; waiting for one" in err]
    assert len(waited) >= 4 and all("after waiting" in errors[name] for name in waited)


def test_slots_of_jobs_killed_with_sigkill_can_be_taken_again_at_once(tmp_path, capfd):
    jobs = start_jobs(tmp_path, [f"job{i}" for i in range(8)], hold_s=600)  # every slot held
    try:
        held = records(tmp_path, jobs)
        assert len({(r["device"], r["index"]) for r in held.values()}) == 8
        killed = ["job1", "job4", "job6"]
        for name in killed:
            jobs[name].send_signal(signal.SIGKILL)
            jobs[name].wait(timeout=30)

        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            taken = {stack.enter_context(gpu_slots.hold(DEVICES, PER_GPU, tmp_path / "locks")) for _ in killed}
            assert time.monotonic() - started < 1  # no wait: nothing polled
        assert taken == {(held[n]["device"], held[n]["index"]) for n in killed}
        assert "waiting" not in capfd.readouterr().err
    finally:
        for job in jobs.values():
            job.kill()
            job.communicate()


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Two fake GPUs, one slot each, locks under tmp_path; not inside SLURM."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.setenv(gpu_slots.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.delenv(gpu_slots.SLOTS_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return tmp_path / "locks"


def test_a_job_sees_only_its_slots_gpu_while_the_next_job_gets_the_other(machine):
    with gpu_slots.for_job("auto") as device:
        assert device == "5" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
        with gpu_slots.hold(["5", "7"], 1, machine) as other:
            assert other == ("7", 0)
        assert (machine / "5.slot0.lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("device, env", [
    ("cpu", {}),
    ("auto", {"CUDA_VISIBLE_DEVICES": ""}),
    ("cuda", {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "0"}),  # SLURM gave the job this one GPU
])
def test_no_slot_on_the_cpu_without_gpus_or_on_a_slurm_jobs_one_gpu(machine, monkeypatch, device, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    visible = os.environ["CUDA_VISIBLE_DEVICES"]
    with gpu_slots.for_job(device) as taken:
        assert taken is None and os.environ["CUDA_VISIBLE_DEVICES"] == visible
    assert not machine.exists()


def test_jobs_of_one_slurm_allocation_share_its_locks_and_another_allocation_has_its_own(machine, monkeypatch):
    # salloc with 2 GPUs, then `snakemake --profile profiles/local` there: jobs spread over the GPUs.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with gpu_slots.for_job("cuda") as device:
        assert device == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert (machine / "slurm-job-42" / "0.slot0.lock").read_text() == f"{os.getpid()}\n"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the allocation's next job
        with gpu_slots.for_job("cuda") as second:
            assert second == "1"
        # Another allocation on the node also numbers its GPUs 0 and 1: its GPU 0 is free.
        monkeypatch.setenv("SLURM_JOB_ID", "43")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        with gpu_slots.for_job("cuda") as other:
            assert other == "0" and gpu_slots.lock_dir() == machine / "slurm-job-43"


def test_cuda_started_before_the_slot_is_an_error(machine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # CUDA_VISIBLE_DEVICES read too early
    with pytest.raises(RuntimeError, match="CUDA started before the GPU slot was taken"):
        with gpu_slots.for_job("cuda"):
            pass


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_slots_per_gpu_names_the_variable(machine, monkeypatch, value):
    monkeypatch.setenv(gpu_slots.SLOTS_ENV, value)
    with pytest.raises(ValueError, match=f"FEDSQ_SLOTS_PER_GPU='{value}': must be a whole number"):
        gpu_slots.slots_per_gpu()

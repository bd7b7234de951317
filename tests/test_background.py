"""Work off the training thread: the serial worker (order, failures that reach the submitting
thread) and the snapshots it saves."""

import threading
import time

import pytest
import torch

from fedsq import checkpoint
from fedsq.background import SerialWorker


def test_jobs_run_in_submission_order_off_the_calling_thread():
    done, threads = [], set()

    def job(i):
        time.sleep(0.01 * (3 - i))  # later jobs are quicker: only the order of submission holds
        done.append(i)
        threads.add(threading.current_thread().name)

    with SerialWorker("test") as worker:
        for i in range(4):
            worker.submit(job, i)
        worker.drain()
    assert done == [0, 1, 2, 3]
    assert len(threads) == 1 and threading.current_thread().name not in threads


def test_a_failed_job_is_raised_by_check_and_drain_and_later_jobs_still_run():
    ran = []
    with SerialWorker("test") as worker:
        gate = threading.Event()
        worker.submit(gate.wait)
        worker.submit(lambda: 1 / 0)
        worker.submit(ran.append, "after")
        worker.check()  # nothing finished yet: no error, no waiting
        gate.set()
        with pytest.raises(ZeroDivisionError):
            worker.drain()
    assert ran == ["after"]


def test_check_raises_once_the_failed_job_has_finished():
    with SerialWorker("test") as worker:
        worker.submit(lambda: 1 / 0).exception()  # wait for it
        with pytest.raises(ZeroDivisionError):
            worker.check()
        worker.check()  # reported once


def test_wait_returns_every_failure_without_raising():
    with SerialWorker("test") as worker:
        worker.submit(lambda: 1 / 0)
        worker.submit(lambda: {}["key"])
        assert [type(e) for e in worker.wait()] == [ZeroDivisionError, KeyError]
        assert worker.wait() == []


def test_a_snapshot_is_not_reached_by_later_in_place_updates():
    state = {"momentum": torch.zeros(3), "nested": [torch.ones(2)], "round": 1}
    saved = checkpoint.snapshot(state)
    state["momentum"].add_(1)
    state["nested"][0].mul_(5)
    assert saved["momentum"].tolist() == [0, 0, 0] and saved["nested"][0].tolist() == [1, 1]
    assert saved["round"] == 1



def test_submit_waits_while_max_waiting_jobs_wait_to_start():
    submitted = started = 0
    most_waiting = 0
    lock = threading.Lock()

    def slow_writer():  # a checkpoint on a slow disk: far slower than the submitting loop
        nonlocal started
        with lock:
            started += 1
        time.sleep(0.02)

    with SerialWorker("test", max_waiting=1) as worker:
        for _ in range(6):
            worker.submit(slow_writer)
            with lock:
                submitted += 1
                most_waiting = max(most_waiting, submitted - started - 1)  # one may be running
        worker.drain()
    assert started == 6
    assert most_waiting <= 1


def test_a_failed_job_frees_its_waiting_slot():
    def fail():
        raise OSError("disk full")

    with SerialWorker("test", max_waiting=1) as worker:
        worker.submit(fail)
        worker.submit(fail)
        later = worker.submit(lambda: "ran")  # does not block for ever
        assert later.result(timeout=10) == "ran"
        assert len(worker.wait()) == 2

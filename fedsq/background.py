"""A serial background worker: a run's side work done in order on one thread.

A round's records cost waits: a database or server round trip per MLflow call, a write and an
fsync per checkpoint.
Done on one background thread, they overlap the training instead of adding to it.

Jobs run in submission order, so each may rely on every earlier one: the MLflow run exists
before metrics are logged to it, and round r's checkpoint replaces round r-1's, never the
reverse. A job's exception reaches the submitting thread through ``check`` or ``drain``.

With ``max_waiting``, ``submit`` blocks while that many jobs wait to start: a writer slower than
the training (a checkpoint of 228 MB a round on a slow shared filesystem) holds the training
back instead of queueing copies of the model in memory without end.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class SerialWorker:
    """One worker thread (a context manager: leaving it waits for the thread to end)."""

    def __init__(self, name: str, max_waiting: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[Future] = []
        self._waiting_slots = None if max_waiting is None else threading.Semaphore(max_waiting)

    def submit(self, job: Callable, *args, **kwargs) -> Future:
        """Queue ``job(*args, **kwargs)``; with ``max_waiting``, first wait until fewer jobs than that wait to start."""
        if self._waiting_slots is not None:
            self._waiting_slots.acquire()
            job = self._freeing_its_slot(job)
        future = self._pool.submit(job, *args, **kwargs)
        self._pending.append(future)
        return future

    def _freeing_its_slot(self, job: Callable) -> Callable:
        @functools.wraps(job)
        def started(*args, **kwargs):
            self._waiting_slots.release()
            return job(*args, **kwargs)

        return started

    def check(self) -> None:
        """Raise the first failure among the jobs finished so far, without waiting."""
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def wait(self) -> list[BaseException]:
        """Wait for every submitted job; return the failures in submission order."""
        pending, self._pending = self._pending, []
        return [error for error in (future.exception() for future in pending) if error is not None]

    def drain(self) -> None:
        """Wait for every submitted job; raise the first failure."""
        failures = self.wait()
        if failures:
            raise failures[0]

    def __enter__(self) -> SerialWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True)

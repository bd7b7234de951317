"""MLflow in a helper process: a run's ``tracking.Tracker`` without its cost to training.

MLflow spends seconds of pure Python before its first call (its imports, its SQLAlchemy
store) and a little on every call. On a thread of the run, that work holds the GIL and
stalls a training loop that uses every core: measured at 2 threads on 2 cores, MLflow's
~3.5 s start cost the run ~10 s. In a process of its own it costs only its CPU time.

The helper is a plain ``python -m fedsq.tracking_process`` serving Trackers through a
``multiprocessing`` manager. It is not forked (the run has torch's threads) and not started
by ``multiprocessing``'s spawn, which would run the caller's script again in the helper
unless it had an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from multiprocessing.managers import BaseManager, MakeProxyType
from pathlib import Path

import fedsq


class _TrackingManager(BaseManager):
    """Serves ``tracking.Tracker`` objects from the helper process."""


class _TrackerFactory:
    # A method, not a constructor, makes the Tracker: a method's exception reaches the caller
    # as itself (say, OSError for a store it cannot create), a constructor's as a RemoteError.
    def tracker(self, *args, **kwargs):
        from fedsq import tracking  # imported in the helper process only

        return tracking.Tracker(*args, **kwargs)


_TRACKER_METHODS = ("log_params", "log_metrics", "set_tags", "log_artifact", "finish")


class RemoteTracker(MakeProxyType("_TrackerMethods", _TRACKER_METHODS)):
    """A ``tracking.Tracker`` in the helper process: each call blocks until it is done there,
    and a failure there is raised here."""

    _exposed_ = (*_TRACKER_METHODS, "__getattribute__")

    @property
    def run_id(self) -> str:
        return self._callmethod("__getattribute__", ("run_id",))


_TrackingManager.register("TrackerFactory", _TrackerFactory, method_to_typeid={"tracker": "Tracker"})
_TrackingManager.register("Tracker", proxytype=RemoteTracker, create_method=False)


class TrackingProcess:
    """The helper process, started on first use (a context manager: leaving it stops it)."""

    def __init__(self) -> None:
        self._helper: subprocess.Popen | None = None
        self._manager: _TrackingManager | None = None

    def tracker(self, *args, **kwargs) -> RemoteTracker:
        """``tracking.Tracker(*args, **kwargs)``, made in the helper process."""
        if self._manager is None:
            self._start()
        return self._manager.TrackerFactory().tracker(*args, **kwargs)

    def _start(self) -> None:
        authkey = os.urandom(32)
        root = str(Path(fedsq.__file__).resolve().parents[1])  # fedsq importable, installed or not
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "fedsq.tracking_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, text=True,
        )
        self._helper.stdin.write(authkey.hex() + "\n")  # not on the command line, where ps shows it
        self._helper.stdin.flush()
        address = self._helper.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"the MLflow helper process failed to start (exit code {self._helper.wait()})")
        self._manager = _TrackingManager(address=address, authkey=authkey)
        self._manager.connect()

    def __enter__(self) -> TrackingProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._helper is not None:
            self._helper.stdin.close()  # the helper's signal to exit
            self._helper.wait()


def _serve() -> None:
    # Ctrl-C and scancel's SIGTERM reach every process of the group or job: the run decides
    # what MLflow hears (a KILLED run), so the helper must outlive the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    server = _TrackingManager(authkey=authkey).get_server()  # listening from here on
    print(server.address, flush=True)
    # The run holds our stdin open until it ends, kill -9 included: then it reads as EOF.
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    _serve()

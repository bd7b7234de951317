"""MLflow tracking for FL runs: a race-free store set-up, a resumable run logger, and a mirror
that keeps an MLflow run up with its run's own records through store outages.

Everything goes through an explicit ``MlflowClient``; nothing here touches mlflow's global
"active run" state, so several runs (or tests) can live in one process.

Parallel jobs on a fresh SQLite store race on its schema migration (seen: 3 jobs, one
failed), so the store and the experiment are created once under a file lock beside the
database. Servers (http://, postgresql://, ...) migrate themselves; there we only tolerate
a concurrent ``create_experiment``.

A run's record is its files (``metrics.csv``, ``summary.json``, partition stats); its MLflow
run is a copy. Every write to it is idempotent ((key, step) pairs already logged are skipped,
params must agree, artifacts are overwritten), so whatever the store missed (an outage, a
kill -9) is replayed into the same run: at the next round, at the end, or by ``sync``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import filelock
import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

import fedsq.version
from fedsq import tracking_uri

STATUSES = ("FINISHED", "FAILED", "KILLED")
LOCK_TIMEOUT_S = 600

# MLflow retries an unanswered HTTP call for about 4 minutes (7 retries, 120 s timeout), minutes
# in which a run's writer thread would hold its checkpoints back. The run's files are its record
# and MLflow is replayed from them, so fail within seconds; a user's own settings win.
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
    os.environ.setdefault(_name, _value)

# What a store that does not answer raises: MLflow's wrapping of a failed call, requests' own
# errors (MLflow's HTTP artifact upload lets them through), and ``tracking_uri.check``'s.
UNAVAILABLE = (MlflowException, requests.RequestException, ConnectionError)


def init_store(uri: str | None = None, experiment: str = "fedsq") -> str:
    """Create the store and the experiment exactly once, safe with many processes at once.

    Idempotent; returns the resolved URI. Call it before starting parallel runs (the pipeline
    does), though every ``Tracker`` calls it too.
    """
    uri = tracking_uri.check(uri)  # a server that is not there: one line in seconds, not minutes of retries
    db_path = tracking_uri.sqlite_path(uri)
    if db_path is None:
        _get_or_create_experiment(MlflowClient(uri), experiment, artifact_location=None)
        return uri
    lock = filelock.FileLock(f"{db_path}.lock", timeout=LOCK_TIMEOUT_S)
    with lock:
        # Opening the client runs the schema migration on a fresh file: only one process may.
        client = MlflowClient(uri)
        # Artifacts beside the database, not in ./mlruns of whatever directory a job runs in.
        artifacts = (db_path.parent / "mlflow-artifacts").resolve().as_uri()
        _get_or_create_experiment(client, experiment, artifact_location=artifacts)
    return uri


def _get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as err:
        # Another process created it between our lookup and our create: that is fine.
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


class Tracker:
    """One MLflow run: a new one, or an existing one resumed after a restart.

    A resumed run never logs a metric step twice: (key, step) pairs already in the run are
    skipped, so a run killed mid-round and restarted from its last checkpoint leaves each
    metric with exactly one value per round.

    Args:
        uri: tracking URI (see ``tracking_uri.resolve_uri``).
        experiment: experiment name; created if missing.
        run_id: None starts a new run; an id resumes that run (status set back to RUNNING).
        run_name: display name of a new run.
        tags: tags of a new run (method, backbone, dataset, split, seed, ...); the code
            version is added here.
        params: the run's params (see ``log_params``); a resumed run whose params differ is
            refused before it is set back to RUNNING, so that a refusal leaves it as it was.
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "fedsq",
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict | None = None,
        params: dict | None = None,
    ) -> None:
        self.uri, self.experiment = init_store(uri, experiment), experiment
        self.client = MlflowClient(self.uri)
        if run_id is None:
            experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            version = fedsq.version.code_version()
            # A None tag is an unset value, not the string "None".
            all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None} | {"code_version": version}
            if "+" in version:
                # The UI shows this standard tag as the run's source commit.
                all_tags["mlflow.source.git.commit"] = version.split("+", 1)[1].removesuffix("-dirty")
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
            self._params: dict[str, str] = {}
            self._logged_steps: set[tuple[str, int]] = set()
        else:
            run = self.client.get_run(run_id)
            self.run_id, self._params = run_id, dict(run.data.params)
            self._new_params(params or {})  # raises before the run is touched
            self.client.update_run(run_id, status="RUNNING")
            self._logged_steps = {
                (key, m.step) for key in run.data.metrics for m in self.client.get_metric_history(run_id, key)
            }
        self.log_params(params or {})

    def reopen(self) -> Tracker:
        """This run opened again, what the store holds read afresh: a call that failed may have landed."""
        return Tracker(self.uri, self.experiment, run_id=self.run_id)

    def _new_params(self, params: dict) -> list[Param]:
        """The params not yet in the run; a param already there with another value is an error."""
        new = []
        for key, value in params.items():
            value = str(value)[:MAX_PARAM_VAL_LENGTH]
            if key in self._params:
                if self._params[key] != value:
                    raise ValueError(
                        f"param {key!r} is {self._params[key]!r} in MLflow run {self.run_id} "
                        f"but {value!r} now: a resumed run must keep its config"
                    )
                continue
            new.append(Param(key, value))
        return new

    def log_params(self, params: dict) -> None:
        """Log a flat dict of params (values as strings, cut to MLflow's 6000 characters).

        Params already in the run with the same value are skipped, so a resumed run can log
        its config again; a different value is an error (a resume must not change the config).
        """
        new = self._new_params(params)
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        self._params.update((p.key, p.value) for p in new)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log metrics at one step; None or NaN means "not measured this step" and is skipped."""
        self._log([(step, metrics)])

    def log_history(self, rows: Iterable[dict]) -> None:
        """Log per-round rows of metrics, each at its ``round`` as the step; steps already logged are skipped."""
        self._log([(row["round"], {k: v for k, v in row.items() if k != "round"}) for row in rows])

    def _log(self, steps: list[tuple[int, dict]]) -> None:
        timestamp = int(time.time() * 1000)
        new = [
            Metric(key, float(value), timestamp, int(step))
            for step, metrics in steps
            for key, value in metrics.items()
            if value is not None and not math.isnan(value) and (key, step) not in self._logged_steps
        ]
        for start in range(0, len(new), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=new[start : start + MAX_METRICS_PER_BATCH])
        self._logged_steps.update((m.key, m.step) for m in new)

    def set_tags(self, tags: dict) -> None:
        """Add or overwrite tags (e.g. the lr a calibration picked, known only after start)."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or every file under a folder."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"run status {status!r}: allowed are {', '.join(STATUSES)}")
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")


class Mirror:
    """A run's Tracker kept up with the run's records, through outages of the store.

    ``record`` hands the Tracker an action that carries everything recorded so far (every
    metrics row, not only the newest), so the first action that reaches the store after an
    outage replays what it missed. The first failure warns; the run goes on either way.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.behind, self._warned = tracker, False, False

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def record(self, action: Callable[[Tracker], object]) -> bool:
        """``action(tracker)``; False when the store did not take it."""
        try:
            if self.behind:
                self.tracker = self.tracker.reopen()  # what a failed call landed is read back, not logged twice
            action(self.tracker)
        except UNAVAILABLE as err:
            if not self._warned:
                self._warned = True
                reason = str(err).splitlines()[0][:300]
                warnings.warn(f"MLflow store {self.tracker.uri} did not answer for run {self.run_id} ({reason}); "
                              "training goes on with metrics.csv as the record, and MLflow catches up when the "
                              "store answers", stacklevel=2)
            self.behind = True
            return False
        self.behind = False
        return True


def record_end(tracker: Tracker, run_dir: Path, summary_file: Path) -> None:
    """A finished run's whole record, from its files: every round of ``metrics.csv``, the summary
    metrics, the artifacts (partition stats, metrics.csv, summary.json), then FINISHED."""
    run_dir = Path(run_dir)
    summary = json.loads(Path(summary_file).read_text())
    tracker.log_history(pd.read_csv(run_dir / "metrics.csv").to_dict("records"))
    tracker.log_metrics({
        f"summary.{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    } | {f"summary.client_acc_{k}": v for k, v in summary["client_acc"].items()}, step=summary["rounds"])
    partition = Path(summary["config"]["paths"]["partition"] or run_dir / "partition")
    for name in ("class_counts.csv", "heatmap.png"):
        tracker.log_artifact(partition / name, "partition")
    tracker.log_artifact(run_dir / "metrics.csv")
    tracker.log_artifact(summary_file)
    tracker.finish("FINISHED")


def sync(run_dir: Path) -> Tracker:
    """Replay a finished run's records into its MLflow run (``record_end``): what the store
    missed is added, nothing is logged twice. Returns the run's Tracker."""
    summary_file = Path(run_dir) / "summary.json"
    if not summary_file.exists():
        raise ValueError(f"{run_dir}: no summary.json, not a finished run (a stopped run catches up when it resumes)")
    summary = json.loads(summary_file.read_text())
    where = summary["config"]["tracking"]
    tracker = Tracker(where["uri"], where["experiment"], run_id=summary["mlflow_run_id"])
    record_end(tracker, run_dir, summary_file)
    return tracker

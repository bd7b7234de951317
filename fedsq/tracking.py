"""MLflow tracking for FL runs: a race-free store set-up and a resumable run logger.

Everything goes through an explicit ``MlflowClient``; nothing here touches mlflow's global
"active run" state, so several runs (or tests) can live in one process.

Parallel jobs on a fresh SQLite store race on its schema migration (seen: 3 jobs, one
failed), so the store and the experiment are created once under a file lock beside the
database. Servers (http://, postgresql://, ...) migrate themselves; there we only tolerate
a concurrent ``create_experiment``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import filelock
import sqlalchemy.engine
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

import fedsq.version

DEFAULT_URI = "sqlite:///results/mlflow.db"
STATUSES = ("FINISHED", "FAILED", "KILLED")
LOCK_TIMEOUT_S = 600


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: the argument, else $MLFLOW_TRACKING_URI, else a SQLite file under results/."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    db_path = _sqlite_path(uri)
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:"):
        return None
    database = sqlalchemy.engine.make_url(uri).database
    if not database or database == ":memory:":
        raise ValueError(f"tracking uri {uri!r}: an MLflow SQLite store needs a file, e.g. sqlite:///results/mlflow.db")
    return Path(database)


def init_store(uri: str | None = None, experiment: str = "fedsq") -> str:
    """Create the store and the experiment exactly once, safe with many processes at once.

    Idempotent; returns the resolved URI. Call it before starting parallel runs (the pipeline
    does), though every ``Tracker`` calls it too.
    """
    uri = resolve_uri(uri)
    db_path = _sqlite_path(uri)
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
        uri: tracking URI (see ``resolve_uri``).
        experiment: experiment name; created if missing.
        run_id: None starts a new run; an id resumes that run (status set back to RUNNING).
        run_name: display name of a new run.
        tags: tags of a new run (method, backbone, dataset, split, seed, ...); the code
            version is added here.
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "fedsq",
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict | None = None,
    ) -> None:
        self.uri = init_store(uri, experiment)
        self.client = MlflowClient(self.uri)
        if run_id is None:
            experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            version = fedsq.version.code_version()
            # A None tag is an unset value, not the string "None".
            all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None} | {"code_version": version}
            if "+" in version:
                # The UI shows this standard tag as the run's source commit.
                all_tags["mlflow.source.git.commit"] = version.split("+", 1)[1].removesuffix("-dirty")
            run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
            self._logged_steps: set[tuple[str, int]] = set()
        else:
            run = self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
            self._logged_steps = {
                (key, m.step) for key in run.data.metrics for m in self.client.get_metric_history(run_id, key)
            }
        self.run_id = run.info.run_id
        self._params = dict(run.data.params)

    def log_params(self, params: dict) -> None:
        """Log a flat dict of params (values as strings, cut to MLflow's 6000 characters).

        Params already in the run with the same value are skipped, so a resumed run can log
        its config again; a different value is an error (a resume must not change the config).
        """
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
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        self._params.update((p.key, p.value) for p in new)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log metrics at one step; None or NaN means "not measured this step" and is skipped."""
        timestamp = int(time.time() * 1000)
        new = [
            Metric(key, float(value), timestamp, step)
            for key, value in metrics.items()
            if value is not None and not math.isnan(value) and (key, step) not in self._logged_steps
        ]
        for start in range(0, len(new), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=new[start : start + MAX_METRICS_PER_BATCH])
        self._logged_steps.update((m.key, step) for m in new)

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

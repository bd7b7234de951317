"""MLflow tracking: parallel start on a fresh store, resume without duplicate steps, URI precedence.
(A server that goes away mid-run: test_tracking_outage.py.)"""

import multiprocessing

import pytest
from mlflow.tracking import MlflowClient

from fedsq import tracking, tracking_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (its schema migration takes seconds); tests use their own experiments."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def uri(store):
    return f"sqlite:///{store}/mlflow.db"


def _start_run_at_barrier(uri, barrier, seed, results):
    barrier.wait()
    try:
        tracker = tracking.Tracker(uri, experiment="race", tags={"seed": seed})
        tracker.log_metrics({"val_acc": 0.1 * seed}, step=1)
        tracker.finish()
        results.put(("ok", tracker.run_id))
    except Exception as err:  # reported to the parent, which fails the test with it
        results.put(("error", repr(err)))


def test_parallel_runs_on_fresh_sqlite_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    # Fork: workers start in milliseconds, so they really hit the fresh store together.
    ctx = multiprocessing.get_context("fork")
    jobs = 5
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_start_run_at_barrier, args=(uri, barrier, seed, results)) for seed in range(jobs)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [o for o in outcomes if o[0] == "error"] == []
    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "race"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert {r.info.run_id for r in runs} == {o[1] for o in outcomes}
    assert sorted(r.data.tags["seed"] for r in runs) == [str(s) for s in range(jobs)]


def test_init_store_is_idempotent(uri):
    assert tracking.init_store(uri, "exp") == uri
    first = MlflowClient(uri).get_experiment_by_name("exp").experiment_id
    tracking.init_store(uri, "exp")
    assert [e.experiment_id for e in MlflowClient(uri).search_experiments() if e.name == "exp"] == [first]


def test_resume_logs_into_same_run_without_duplicate_steps(uri):
    first = tracking.Tracker(uri, experiment="resume", tags={"method": "fedsq", "lr_mode": None})
    first.log_params({"optimizer.lr": 0.01, "rounds": 3})
    first.log_metrics({"val_acc": 0.5, "val_loss": 1.5}, step=1)
    first.log_metrics({"val_acc": 0.6}, step=2)  # killed before val_loss of round 2

    resumed = tracking.Tracker(uri, experiment="resume", run_id=first.run_id)
    assert resumed.client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params({"optimizer.lr": 0.01, "rounds": 3})  # same config again: accepted
    resumed.log_metrics({"val_acc": 0.99, "val_loss": 1.2}, step=2)  # round 2 replayed
    resumed.log_metrics({"val_acc": 0.7, "val_loss": 1.0}, step=3)
    resumed.finish()

    client = MlflowClient(uri)

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, key))

    assert history("val_acc") == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert history("val_loss") == [(1, 1.5), (2, 1.2), (3, 1.0)]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "fedsq" and "lr_mode" not in run.data.tags
    assert run.data.tags["code_version"].startswith(tracking.fedsq.__version__)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_with_changed_param_is_an_error_that_leaves_the_run_as_it_was(uri):
    tracker = tracking.Tracker(uri, params={"rounds": 3})
    with pytest.raises(ValueError, match="'rounds'"):
        tracking.Tracker(uri, run_id=tracker.run_id).log_params({"rounds": 5})
    tracker.finish("KILLED")
    with pytest.raises(ValueError, match="'rounds' is '3' .* but '5' now"):
        tracking.Tracker(uri, run_id=tracker.run_id, params={"rounds": 5})
    assert tracker.client.get_run(tracker.run_id).info.status == "KILLED"  # not reopened: not left RUNNING


def test_params_are_batched_and_truncated(uri):
    tracker = tracking.Tracker(uri)
    params = {f"p{i}": i for i in range(250)} | {"long": "x" * 7000}
    tracker.log_params(params)
    logged = tracker.client.get_run(tracker.run_id).data.params
    assert len(logged) == 251
    assert logged["p249"] == "249"
    assert len(logged["long"]) == 6000


def test_unmeasured_metrics_are_skipped(uri):
    tracker = tracking.Tracker(uri)
    tracker.log_metrics({"val_acc": 0.5, "test_acc": None, "gate_agreement": float("nan")}, step=0)
    assert set(tracker.client.get_run(tracker.run_id).data.metrics) == {"val_acc"}


def test_context_manager_marks_failed_run(uri):
    with pytest.raises(RuntimeError):
        with tracking.Tracker(uri) as tracker:
            raise RuntimeError("loss is NaN")
    assert tracker.client.get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.finish("DONE")


def test_artifacts_land_beside_the_sqlite_store(uri, store, tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    tracker = tracking.Tracker(uri, experiment="artifacts")
    tracker.log_artifact(tmp_path / "summary.json")
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id)] == ["summary.json"]
    assert list((store / "mlflow-artifacts").rglob(f"{tracker.run_id}/artifacts/summary.json"))


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri.resolve_uri() == "sqlite:///results/mlflow.db"
    assert (tmp_path / "results").is_dir()  # SQLite cannot create the parent folder itself
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri.resolve_uri() == "http://tracking.example:5000"
    assert tracking_uri.resolve_uri("sqlite:///other/x.db") == "sqlite:///other/x.db"
    assert (tmp_path / "other").is_dir()


def test_in_memory_sqlite_is_rejected():
    with pytest.raises(ValueError, match="needs a file"):
        tracking_uri.resolve_uri("sqlite://")

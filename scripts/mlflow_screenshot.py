"""The README's MLflow picture, taken from a real store: `mlflow ui` on it, headless Chromium on
the experiment's runs table (MLflow 3 opens an experiment on its GenAI overview, not its runs).

Before the picture it checks that a user finds every run: the MLflow run of each finished run
folder (summary.json's ``mlflow_run_id``) must be in the experiment (MLflow's REST API) and linked
from the runs page as Chromium renders it. Offline; needs Chromium (Debian: apt-get install chromium).

    python scripts/mlflow_screenshot.py [--store sqlite:///results/mlflow.db] [--experiment fedsq-offline]
        [--runs results] [--out docs/img/mlflow-ui.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_WAIT_MS = 30_000  # virtual time for the page's scripts to fetch and draw the runs
WINDOW = "1600,1000"


def expected_runs(runs_root: Path) -> dict[str, str]:
    """MLflow run id -> run folder, for every finished run under ``runs_root``."""
    runs = {}
    for path in sorted(runs_root.rglob("summary.json")):
        run_id = json.loads(path.read_text()).get("mlflow_run_id")
        if run_id:
            runs[run_id] = str(path.parent)
    if not runs:
        raise SystemExit(f"no finished runs (summary.json) under {runs_root}")
    return runs


def start_ui(store: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "w") as out:  # a session of its own, so that stopping it stops its workers too
        ui = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=out, stderr=out, env=env, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return ui, url
        except OSError:
            if ui.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow ui did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def api(url: str, endpoint: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def chromium(*args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("Chromium not found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={WINDOW}", f"--virtual-time-budget={CHROMIUM_WAIT_MS}", *args],
            capture_output=True, text=True, check=True, timeout=300).stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///results/mlflow.db", help="the MLflow store of the runs")
    parser.add_argument("--experiment", default="fedsq-offline")
    parser.add_argument("--runs", default="results", help="folder holding the finished runs (summary.json)")
    parser.add_argument("--out", default="docs/img/mlflow-ui.png")
    args = parser.parse_args(argv)

    expected = expected_runs(Path(args.runs))
    with tempfile.TemporaryDirectory() as tmp:
        ui, url = start_ui(args.store, Path(tmp) / "mlflow-ui.log")
        try:
            name = urllib.parse.quote(args.experiment)
            experiment_id = api(url, f"experiments/get-by-name?experiment_name={name}")["experiment"]["experiment_id"]
            found = api(url, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])
            missing = set(expected) - {run["info"]["run_id"] for run in found}
            if missing:
                raise SystemExit(f"runs not in MLflow experiment {args.experiment}: "
                                 + ", ".join(f"{expected[r]} ({r})" for r in sorted(missing)))
            page = f"{url}/#/experiments/{experiment_id}/runs"  # the runs table, as the README says
            dom = chromium("--dump-dom", page)
            unlisted = [folder for run_id, folder in expected.items() if run_id not in dom]
            if unlisted:
                raise SystemExit(f"{page} does not list the runs of: {', '.join(unlisted)}")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            chromium(f"--screenshot={Path(args.out).resolve()}", page)
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=60)
    print(f"{len(expected)} runs listed at #/experiments/{experiment_id}/runs; picture in {args.out}")


if __name__ == "__main__":
    main()

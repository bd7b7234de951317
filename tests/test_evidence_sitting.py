"""scripts/evidence_sitting.py: each sitting of the evidence grid, stopped early or not, is added
to the records with its wall and CPU time and the runs it computed or reused."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evidence_sitting.py"
BURN = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\n"


def test_a_sitting_is_recorded_with_its_cpu_time_and_runs(tmp_path):
    for name, summary in [("seed1", {}), ("seed2", {"reused_from": "records/x"})]:
        folder = tmp_path / "results" / "runs" / "digits" / "b" / "iid" / "fedsq" / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
    # The runs above were written before this sitting started: they are not its own.
    subprocess.run([sys.executable, SCRIPT, tmp_path, "--", sys.executable, "-c", BURN], check=True)
    time.sleep(0.01)
    (tmp_path / "results" / "runs" / "digits" / "b" / "iid" / "fedsq" / "seed1" / "summary.json").touch()
    code = BURN + "from pathlib import Path\nPath('results/runs/digits/b/iid/fedsq/seed2/summary.json').touch()\n"
    subprocess.run([sys.executable, SCRIPT, tmp_path, "--", sys.executable, "-c", code], check=True, cwd=tmp_path)
    sittings = pd.read_csv(tmp_path / "records" / "sittings.csv")
    assert len(sittings) == 2 and (sittings["cpu_seconds"] >= 0.4).all()
    assert sittings[["runs_computed", "runs_reused"]].values.tolist() == [[0, 0], [0, 1]]


def test_a_sitting_stopped_early_is_recorded_and_keeps_its_exit_status(tmp_path):
    sitting = subprocess.Popen([sys.executable, SCRIPT, tmp_path, "--", sys.executable, "-c",
                                BURN + "time.sleep(60)"])
    time.sleep(2)
    sitting.send_signal(signal.SIGTERM)  # passed on to the command, then the row written
    assert sitting.wait(timeout=30) != 0
    assert len(pd.read_csv(tmp_path / "records" / "sittings.csv")) == 1


def test_a_sitting_whose_machine_stops_under_it_keeps_its_row_up_to_then(tmp_path):
    out = tmp_path / "records" / "sittings.csv"
    sitting = subprocess.Popen([sys.executable, SCRIPT, tmp_path, "--every", "0.2", "--",
                                sys.executable, "-c", "import time; time.sleep(10)"])
    deadline = time.time() + 30
    while not (out.exists() and pd.read_csv(out)["wall_seconds"].item() >= 1) and time.time() < deadline:
        time.sleep(0.1)  # the row is written at the start, then rewritten as the sitting goes on
    sitting.kill()  # SIGKILL: no handler runs, as when the machine itself stops
    sitting.wait(timeout=30)
    row = pd.read_csv(out).squeeze("rows")
    assert row["wall_seconds"] >= 1 and pd.isna(row["cpu_seconds"])  # CPU time is known only at the end

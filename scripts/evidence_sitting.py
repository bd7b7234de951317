"""Run one sitting of the evidence grid and append it to the grid's records: its wall and CPU
time, and how many runs it computed or reused, so that the README can state what the whole grid
cost over every sitting and machine it took.

    python scripts/evidence_sitting.py evidence -- snakemake ...   (make evidence runs it)

The command runs as a child in a process group of its own; SIGTERM and SIGINT are passed on to
the whole group, so that a sitting stopped early (a session's end, Ctrl-C) stops at once and is
recorded as well: Snakemake alone would wait for its running jobs (an lr of a sweep is many
minutes), while each job, stopped, keeps what it finished (an FL run its checkpoint of the last
round, a sweep each lr it scored). CPU time is the children's user and system
time (``getrusage``), which includes every job Snakemake ran and which other work on a shared
machine does not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

COLUMNS = ["started_utc", "finished_utc", "wall_seconds", "cpu_seconds", "host", "cores", "runs_computed", "runs_reused"]


def sitting(grid: Path, started: float, finished: float, cpu_seconds: float) -> dict:
    """This sitting's row: runs whose summary.json it wrote, split by whether they reused a record."""
    computed = reused = 0
    for summary in (grid / "results").glob("*/*/*/*/*/seed*/summary.json"):
        if summary.stat().st_mtime >= started:
            if "reused_from" in json.loads(summary.read_text()):
                reused += 1
            else:
                computed += 1

    def utc(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "started_utc": utc(started), "finished_utc": utc(finished), "wall_seconds": round(finished - started),
        "cpu_seconds": round(cpu_seconds, 1), "host": platform.node(), "cores": os.cpu_count(),
        "runs_computed": computed, "runs_reused": reused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the grid's folder (evidence/); its records/sittings.csv gets the row")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the sitting's command (snakemake ...)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run after --")
    started = time.time()
    child = subprocess.Popen(command, start_new_session=True)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda signum, frame: os.killpg(child.pid, signum))
    status = child.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = args.grid / "records" / "sittings.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    row = pd.DataFrame([sitting(args.grid, started, time.time(), usage.ru_utime + usage.ru_stime)], columns=COLUMNS)
    row.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(f"{out}: {row.iloc[0].to_dict()}")
    sys.exit(status)


if __name__ == "__main__":
    main()

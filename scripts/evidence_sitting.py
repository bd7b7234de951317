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

A machine can also stop under a sitting with no signal at all (a lost VM, a power cut). So the
row is written when the sitting starts and rewritten every minute while it runs: such a sitting
keeps its wall time and runs up to its last minute, and a blank CPU time, which the README counts
as unrecorded (the children's CPU time is known only once Snakemake has exited).
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


def sitting(grid: Path, started: float, finished: float, cpu_seconds: float | None) -> dict:
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
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1), "host": platform.node(), "cores": os.cpu_count(),
        "runs_computed": computed, "runs_reused": reused,
    }


def record(out: Path, row: dict) -> None:
    """Write this sitting's row into sittings.csv, in place of the one it wrote before (same start)."""
    rows = pd.DataFrame([row], columns=COLUMNS)
    if out.exists():
        earlier = pd.read_csv(out)
        rows = pd.concat([earlier[earlier["started_utc"] != row["started_utc"]], rows])
    partial = out.with_suffix(".partial.csv")
    rows.to_csv(partial, index=False)
    partial.replace(out)  # a machine that stops mid-write leaves the previous file whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [--every SECONDS] grid -- command ...")
    parser.add_argument("grid", type=Path, help="the grid's folder (evidence/); its records/sittings.csv gets the row")
    parser.add_argument("--every", type=float, default=60, metavar="SECONDS",
                        help="rewrite the sitting's row this often while it runs (default: 60)")
    own = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    args, command = parser.parse_args(own), sys.argv[len(own) + 2:]
    if not command:
        parser.error("no command to run after --")
    out = args.grid / "records" / "sittings.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    child = subprocess.Popen(command, start_new_session=True)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda signum, frame: os.killpg(child.pid, signum))
    while True:
        record(out, sitting(args.grid, started, time.time(), cpu_seconds=None))
        try:
            status = child.wait(timeout=args.every)
            break
        except subprocess.TimeoutExpired:
            pass
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = sitting(args.grid, started, time.time(), usage.ru_utime + usage.ru_stime)
    record(out, row)
    print(f"{out}: {row}")
    sys.exit(status)


if __name__ == "__main__":
    main()

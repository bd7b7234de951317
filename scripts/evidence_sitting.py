"""Append one sitting of `make evidence` to the grid's records: its wall and CPU time, and how
many runs it computed or reused, so that the README can state what the whole grid cost over
every sitting and machine it took.

    python scripts/evidence_sitting.py evidence STARTED_EPOCH   (make evidence runs it)

CPU time is read from ``evidence/cpu_times``, the shell's ``times`` after Snakemake: its second
line is the user and system time of everything Snakemake ran, which other work on a shared
machine does not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

COLUMNS = ["started_utc", "finished_utc", "wall_seconds", "cpu_seconds", "host", "cores", "runs_computed", "runs_reused"]


def children_cpu_seconds(times_output: str) -> float:
    """User + system seconds of the shell's children, from `times` (``0m1.5s 0m0.2s`` per line)."""
    return sum(60 * int(m) + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", times_output.splitlines()[1]))


def sitting(grid: Path, started: int, finished: int) -> dict:
    """This sitting's row: runs whose summary.json it wrote, split by whether they reused a record."""
    computed = reused = 0
    for summary in (grid / "results").glob("*/*/*/*/*/seed*/summary.json"):
        if summary.stat().st_mtime >= started:
            if "reused_from" in json.loads(summary.read_text()):
                reused += 1
            else:
                computed += 1
    cpu = grid / "cpu_times"

    def utc(epoch: int) -> str:
        return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "started_utc": utc(started), "finished_utc": utc(finished), "wall_seconds": finished - started,
        "cpu_seconds": round(children_cpu_seconds(cpu.read_text()), 1) if cpu.is_file() else None,
        "host": platform.node(), "cores": os.cpu_count(), "runs_computed": computed, "runs_reused": reused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the grid's folder (evidence/)")
    parser.add_argument("started", type=int, help="when the sitting started (seconds since the epoch)")
    args = parser.parse_args()
    out = args.grid / "records" / "sittings.csv"
    row = pd.DataFrame([sitting(args.grid, args.started, int(time.time()))], columns=COLUMNS)
    row.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(f"{out}: {row.iloc[0].to_dict()}")


if __name__ == "__main__":
    main()

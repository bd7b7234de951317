"""The README's evidence section: written from a records folder, between its markers only."""

import json
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedsq import analysis
from tests.test_report import make_run, plateau

SCRIPT = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "readme_results.py"))
main, grid_progress = SCRIPT["main"], SCRIPT["grid_progress"]


def make_records(records: Path) -> None:
    """A small grid in the records layout: iid and dir0.1, FedSQ and FedAvg, 3 seeds, the equal-lr
    control on dir0.1, the lr sweep and two sittings."""
    rises = {"fedsq": (2, 0.90), "fedavg": (4, 0.80)}
    for seed in range(3):
        for split in ("iid", "dir0.1"):
            for method, (rise, top) in rises.items():
                if split == "iid":  # parity, FedSQ a little off FedAvg in each seed
                    top = 0.88 + 0.002 * seed + [0.001, -0.002, 0.0][seed] * (method == "fedsq")
                else:
                    top += 0.01 * seed * (method == "fedsq")
                make_run(records, method, split, seed, val=plateau(rise, top, rounds=12), targets=(0.5, 0.99))
        for method in rises:  # the equal-lr control: the gain vanishes
            make_run(records, method, "dir0.1", seed, val=plateau(4, 0.80 + 0.003 * seed * (method == "fedsq")),
                     lr_mode="equal", targets=(0.5, 0.99))
    # FedAvg on iid keeps rising: named, its verdicts budget-bound.
    rising = records / "runs" / "digits" / "resnet18" / "iid" / "fedavg"
    for seed in range(3):
        folder = rising / f"seed{seed}"
        metrics = pd.read_csv(folder / "metrics.csv").assign(val_acc=np.linspace(0.1, 0.88 + 0.002 * seed, 13))
        metrics.to_csv(folder / "metrics.csv", index=False)
    for method, scores in [("fedsq", {"0.01": 0.80, "0.03": 0.85}), ("fedavg", {"0.01": 0.78, "0.03": 0.82, "0.1": None})]:
        sweep = records / "calibration" / "digits" / "resnet18" / "dir0.1" / "bn-pooled" / f"{method}.json"
        sweep.parent.mkdir(parents=True, exist_ok=True)
        sweep.write_text(json.dumps({
            "lr": 0.03, "mode": "federated", "scores": scores, "seed": 100, "rounds": 12, "split": "dir0.1",
            "method": method, "bn": "pooled",
        }))
    pd.DataFrame({
        "started_utc": ["2026-12-01T10:00:00", "2026-12-02T09:00:00"],
        "finished_utc": ["2026-12-01T12:00:00", "2026-12-02T10:00:00"],
        "wall_seconds": [3600 + 25 * 60, 1800], "cpu_seconds": [5000, 4600], "host": ["a", "b"],
        "runs_computed": [20, 10], "runs_reused": [0, 20],
    }).to_csv(records / "sittings.csv", index=False)


def test_section_is_generated_from_the_records_and_nothing_else_changes(tmp_path):
    records = tmp_path / "records"
    make_records(records)
    readme = tmp_path / "README.md"
    (tmp_path / "docs" / "img").mkdir(parents=True)
    readme.write_text("# title\n\n<!-- evidence:begin -->\nold numbers\n<!-- evidence:end -->\n\n## after\n")
    config = tmp_path / "evidence.yaml"
    config.write_text(yaml.safe_dump({
        "datasets": ["digits"], "backbones": {"resnet18": {"weights": "scratch"}}, "splits": ["iid", "dir0.1"],
        "methods": ["fedavg", "fedsq"], "seeds": [0, 1, 2], "control": {"splits": ["dir0.1"]},
        "claims": {"parity_margin": 0.02},
    }))

    main([str(records), "--out", str(tmp_path / "report"), "--configfile", str(config), "--readme", str(readme)])

    text = readme.read_text()
    flat = re.sub(r" +", " ", text)  # table cells without their padding
    assert text.startswith("# title\n") and text.endswith("<!-- evidence:end -->\n\n## after\n")
    assert "old numbers" not in text
    assert "18 FL runs (digits × resnet18), seeds 0, 1, 2." in text
    assert "The records hold every one of the grid's 18 FL runs." in text
    # Added up over both sittings: 85 + 30 min of wall time, 9600 s of CPU time.
    assert "**1 h 55 min** of wall time and 2 h 40 min of CPU time (1 h 20 min on 2 idle cores)" in text
    assert "over 2 sitting(s) on 2 machine(s); 30 FL runs computed" in text
    # The declared analysis comes from the same definitions, with the config's margin.
    assert analysis.declared_analysis(0.02, 0.01, 0.05) in text and "±2 points" in text
    # The sweep: each lr's score, the pick in bold, a divergence, a pick at the edge of the grid.
    assert "| dir0.1 | pooled | fedavg | 78.0 | **82.0** | diverged | 0.03 |" in flat
    assert "| dir0.1 | pooled | fedsq | 80.0 | **85.0** | – | 0.03 (edge of grid) |" in flat
    for heading in ["**Primary family**", "**Secondary family**", "**Controls**", "**Does the gain shrink",
                    "**Speed**", "**Per arm**", "**Parity power** (iid, FedSQ vs fedavg)"]:
        assert heading in text, heading
    claims = pd.read_csv(tmp_path / "report" / "tables" / "claims.csv")
    did = claims.query("claim == 'control_gain_shrinks'").iloc[0]
    assert did["verdict"] == "supported"  # the 10-point gain shrinks to about 0 at equal lr
    assert "the gain shrinks under the control" not in text  # the DiD table needs no claim column
    # A target no run reached: a row that says so; the rising arm is named and its verdicts bound.
    assert "rounds to 99%" in text and "not reached" in text
    assert "**Still rising**" in text and "iid fedavg (tuned lr, pooled BN)" in text
    assert "(budget-bound)" in text
    parity = claims.query("claim == 'iid_parity' and family == 'primary'").iloc[0]
    assert f"with **{parity['power']:.0%}** chance" in text and parity["n"] == 3
    assert (tmp_path / "docs" / "img" / "evidence-val-acc.png").stat().st_size > 0


def test_a_grid_the_records_do_not_complete_is_said_to_be_incomplete(tmp_path):
    records = tmp_path / "records"
    make_records(records)
    shutil.rmtree(records / "runs" / "digits" / "resnet18" / "iid" / "fedsq" / "seed2")
    config = tmp_path / "evidence.yaml"
    config.write_text(yaml.safe_dump({
        "datasets": ["digits"], "backbones": {"resnet18": {"weights": "scratch"}}, "splits": ["iid", "dir0.1"],
        "methods": ["fedavg", "fedsq"], "seeds": [0, 1, 2], "control": {"splits": ["dir0.1"]},
    }))
    assert grid_progress(records, config).startswith(
        "**The grid is not complete**: the records hold 17 of its 18 FL runs")


def test_a_readme_without_markers_is_an_error(tmp_path):
    records = tmp_path / "records"
    for method in ("fedsq", "fedavg"):
        make_run(records, method, "iid", 0, 0.8)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        main([str(records), "--out", str(tmp_path / "report"), "--readme", str(readme)])


def test_before_any_run_the_section_declares_the_analysis_and_shows_the_sweep_under_way(tmp_path):
    records = tmp_path / "records"
    partial = records / "calibration" / "digits" / "resnet18" / "dir0.1" / "bn-pooled" / "fedavg.partial.json"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"record_key": {"calibration": {"lrs": [0.01, 0.03, 0.1]}},
                                   "scores": {"0.01": 0.78}, "curves": {"0.01": [0.1, 0.78]}}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- evidence:begin -->\nold numbers\n<!-- evidence:end -->\n")
    stale = tmp_path / "docs" / "img" / "evidence-val-acc.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier grid's plot")
    config = tmp_path / "evidence.yaml"
    config.write_text(yaml.safe_dump({"datasets": ["digits"], "backbones": {"resnet18": {"weights": "scratch"}},
                                      "splits": ["dir0.1"], "methods": ["fedavg", "fedsq"], "seeds": [1, 2, 3]}))

    main([str(records), "--out", str(tmp_path / "report"), "--configfile", str(config), "--readme", str(readme)])

    flat = re.sub(r" +", " ", readme.read_text())
    assert "old numbers" not in flat and "the records hold 0 of its 12 FL runs" in flat
    assert analysis.declared_analysis(0.015, 0.01, 0.05) in flat  # declared before any number
    assert "| dir0.1 | pooled | fedavg | 78.0 | under way (1 of 3 lrs) |" in flat
    assert "No FL run is recorded yet" in flat and not stale.exists()


def test_the_readmes_round_costs_are_the_committed_benchmarks():
    repo = Path(__file__).resolve().parents[1]
    bench = (repo / "benchmarks" / "results" / "round_cost.txt").read_text()
    readme = (repo / "README.md").read_text()
    names = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedsq": "FedSQ"}
    for method, name in names.items():
        before, after = (re.search(rf"^{method}\s+{form}\s+CPU\s.*\s(\d+\.\d+)$", bench, re.M).group(1)
                         for form in ("before", "after"))
        ratio = re.search(rf"^{method}\s+before/after CPU: round (\d+\.\d+)x cheaper", bench, re.M).group(1)
        assert f"{name} {before} → {after} ({ratio}×" in readme, (method, before, after, ratio)

"""The README's evidence section: written from a grid's results/, between its markers only."""

import json
import runpy
from pathlib import Path

import pytest

from fedsq import report
from tests.test_report import make_run

main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "readme_results.py"))["main"]


def test_section_is_generated_from_the_grid_and_nothing_else_changes(tmp_path):
    grid = tmp_path / "evidence"
    results = grid / "results"
    runs = []
    for seed, (fedsq, fedavg) in enumerate([(0.90, 0.80), (0.88, 0.79), (0.91, 0.83)]):
        runs.append(make_run(results, "fedsq", "dir0.1", seed, fedsq))
        runs.append(make_run(results, "fedavg", "dir0.1", seed, fedavg))
    report.build(runs, results)
    for method, lr in [("fedsq", 0.03), ("fedavg", 0.01)]:
        pick = results / "calibration" / "digits" / "resnet18" / "bn-pooled" / f"{method}.json"
        pick.parent.mkdir(parents=True, exist_ok=True)
        pick.write_text(json.dumps({"lr": lr}))
    (grid / "started").write_text("1000")
    (grid / "finished").write_text(str(1000 + 3600 + 25 * 60))
    (grid / "cpu_times").write_text("0m0.01s 0m0.00s\n150m30.5s 10m0.0s\n")  # POSIX `times`
    readme = tmp_path / "README.md"
    (tmp_path / "docs" / "img").mkdir(parents=True)
    readme.write_text("# title\n\n<!-- evidence:begin -->\nold numbers\n<!-- evidence:end -->\n\n## after\n")

    main([str(results), "--readme", str(readme)])

    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith("<!-- evidence:end -->\n\n## after\n")
    assert "old numbers" not in text
    assert "Calibrated learning rates: bn pooled: fedavg 0.01, fedsq 0.03." in text
    assert "**1 h 25 min** of wall time (2 h 40 min of CPU time, i.e. 1 h 20 min on 2 idle cores)" in text and "6 FL runs, 3 seeds" in text
    assert (results / "tables" / "claims.md").read_text().strip() in text
    assert "89.7 ± 1.5" in text  # FedSQ's best val acc over the three seeds, in percent
    # The made-up curves rise in a straight line from 0.1 over 5 rounds: the last quarter
    # (round 5) sits one step of (best - 0.1)/5 above the quarter before (round 4).
    assert f"{100 * (0.90 + 0.88 + 0.91 - 0.3) / 15:+.1f}" in text
    assert "**Not flat after 5 rounds**" in text and "dir0.1 fedsq calibrated pooled" in text
    assert (tmp_path / "docs" / "img" / "evidence-val-acc.png").stat().st_size > 0


def test_a_readme_without_markers_is_an_error(tmp_path):
    results = tmp_path / "results"
    runs = [make_run(results, m, "iid", 0, 0.8) for m in ("fedsq", "fedavg")]
    report.build(runs, results)
    (tmp_path / "docs" / "img").mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        main([str(results), "--readme", str(readme)])

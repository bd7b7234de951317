"""Report: tables equal hand-computed seed statistics, claim verdicts, plots and robustness."""

import json
import statistics

import numpy as np
import pandas as pd
import pytest

from fedsq import report


def make_run(root, method, split, seed, best, *, backbone="resnet18", lr_mode="calibrated", rounds_to=None, rounds=5):
    """A run folder as the engine writes it: summary.json and metrics.csv whose val_acc peaks at `best`."""
    folder = root / ("runs" if lr_mode == "calibrated" else "control") / backbone / split / method / f"seed{seed}"
    folder.mkdir(parents=True)
    val = np.linspace(0.1, best, rounds + 1)
    pd.DataFrame(
        {
            "round": range(rounds + 1),
            "val_acc": val,
            "test_acc": val - 0.01,
            "gate_agreement": np.linspace(1.0, 0.8, rounds + 1),
            "gate_agreement_pretrained_bn": np.linspace(1.0, 0.95, rounds + 1),
        }
    ).to_csv(folder / "metrics.csv", index=False)
    content = {
        "best_val_acc": best,
        "best_round": rounds,
        "test_acc_at_best": best - 0.01,
        "final_val_acc": best,
        "final_test_acc": best - 0.01,
        "last3_val_acc": float(val[-3:].mean()),
        "rounds_to_target": rounds_to if rounds_to is not None else {"0.6": 2, "0.7": None},
        "rounds": rounds,
        "tags": dict(dataset="digits", backbone=backbone, split=split, method=method, seed=str(seed), lr_mode=lr_mode),
        "config": {"dataset": "digits", "backbone": backbone, "method": {"name": method}, "seed": seed},
    }
    (folder / "summary.json").write_text(json.dumps(content))
    return folder


def test_results_table_equals_hand_computed_statistics(tmp_path):
    bests = [0.80, 0.84, 0.90]
    reached = [2, 3, None]
    seeds = zip(range(3), bests, reached)
    runs = [make_run(tmp_path, "fedsq", "iid", s, b, rounds_to={"0.6": r, "0.7": None}) for s, b, r in seeds]
    runs.append(make_run(tmp_path, "fedavg", "iid", 0, 0.75))
    report.build(runs, tmp_path / "out")

    table = pd.read_csv(tmp_path / "out" / "tables" / "results.csv")
    fedsq = table[table["method"] == "fedsq"].iloc[0]
    assert fedsq["n_seeds"] == 3
    assert fedsq["best_val_acc_mean"] == pytest.approx(statistics.mean(bests))
    assert fedsq["best_val_acc_std"] == pytest.approx(statistics.stdev(bests))
    assert fedsq["rounds_to_0.6_mean"] == pytest.approx(2.5)  # the seed that never reached 0.6 is not averaged
    assert fedsq["rounds_to_0.6_reached"] == 2
    assert fedsq["rounds_to_0.7_reached"] == 0
    fedavg = table[table["method"] == "fedavg"].iloc[0]
    assert fedavg["n_seeds"] == 1 and np.isnan(fedavg["best_val_acc_std"])
    assert list(table["method"]) == ["fedavg", "fedsq"]  # paper order, not file order

    markdown = (tmp_path / "out" / "tables" / "results.md").read_text()
    mean, std = 100 * statistics.mean(bests), 100 * statistics.stdev(bests)
    assert f"{mean:.1f} ± {std:.1f}" in markdown
    assert "2.5 ± 0.7 (2/3)" in markdown
    latex = (tmp_path / "out" / "tables" / "results.tex").read_text()
    assert r"\begin{tabular}" in latex and r"best val acc (\%)" in latex and rf"{mean:.1f} $\pm$ {std:.1f}" in latex


@pytest.mark.parametrize(
    ("claim_split", "fedsq", "fedavg", "verdict"),
    [
        ("dir0.1", [0.80, 0.82], [0.70, 0.72], "supported"),
        ("dir0.1", [0.70, 0.72], [0.80, 0.82], "not supported"),
        ("dir0.1", [0.70, 0.80], [0.72, 0.78], "not enough seeds"),  # intervals overlap
        ("dir0.1", [0.80], [0.70], "not enough seeds"),  # one seed
        ("iid", [0.80, 0.81], [0.80, 0.82], "supported"),  # overlap, means 0.5 points apart
        ("iid", [0.70, 0.71], [0.80, 0.81], "not supported"),
        ("iid", [0.60, 0.90], [0.70, 0.95], "not enough seeds"),  # overlap but means 7.5 points apart
    ],
)
def test_accuracy_claim_verdicts(tmp_path, claim_split, fedsq, fedavg, verdict):
    runs = [make_run(tmp_path, "fedsq", claim_split, s, b) for s, b in enumerate(fedsq)]
    runs += [make_run(tmp_path, "fedavg", claim_split, s, b) for s, b in enumerate(fedavg)]
    claims = report.claims_table(report.load_runs(runs)[0])
    claim = "iid_parity" if claim_split == "iid" else "dirichlet_robust"
    row = claims[claims["claim"] == claim].iloc[0]
    assert row["verdict"] == verdict
    assert row["fedsq_mean"] == pytest.approx(np.mean(fedsq))
    assert row["baseline_n"] == len(fedavg)


def test_rounds_claim_uses_highest_target_reached_by_all_seeds(tmp_path):
    fedsq = [{"0.6": 1, "0.7": 2, "0.8": 4}, {"0.6": 1, "0.7": 3, "0.8": None}]
    fedavg = [{"0.6": 3, "0.7": 5, "0.8": 6}, {"0.6": 4, "0.7": 6, "0.8": 7}]
    runs = [make_run(tmp_path, "fedsq", "dir0.5", s, 0.8, rounds_to=r) for s, r in enumerate(fedsq)]
    runs += [make_run(tmp_path, "fedavg", "dir0.5", s, 0.8, rounds_to=r) for s, r in enumerate(fedavg)]
    claims = report.claims_table(report.load_runs(runs)[0])
    row = claims[claims["claim"] == "fewer_rounds"].iloc[0]
    assert row["metric"] == "rounds_to_0.7"  # 0.8 was missed by one fedsq seed
    assert (row["fedsq_mean"], row["baseline_mean"]) == (2.5, 5.5)
    assert row["verdict"] == "supported"


def test_claims_show_equal_lr_control_beside_calibrated(tmp_path):
    runs = []
    for lr_mode, gap in [("calibrated", 0.2), ("equal", 0.0)]:
        runs += [make_run(tmp_path, "fedsq", "dir0.1", s, 0.7 + gap + 0.01 * s, lr_mode=lr_mode) for s in range(2)]
        runs += [make_run(tmp_path, "fedavg", "dir0.1", s, 0.7 + 0.01 * s, lr_mode=lr_mode) for s in range(2)]
        runs += [make_run(tmp_path, "fedprox", "dir0.1", s, 0.7 + 0.01 * s, lr_mode=lr_mode) for s in range(2)]
    report.build(runs, tmp_path / "out")
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv")
    robust = claims[claims["claim"] == "dirichlet_robust"]
    assert list(zip(robust["baseline"], robust["lr_mode"], robust["verdict"])) == [
        ("fedavg", "calibrated", "supported"),
        ("fedavg", "equal", "not enough seeds"),
        ("fedprox", "calibrated", "supported"),
        ("fedprox", "equal", "not enough seeds"),
    ]
    markdown = (tmp_path / "out" / "tables" / "claims.md").read_text()
    assert "FedSQ ≥ baseline under Dirichlet" in markdown and "not enough seeds" in markdown


def test_build_writes_every_table_and_plot(tmp_path):
    grid = [(m, sp, s) for m in ("fedavg", "fedsq") for sp in ("iid", "dir0.1") for s in range(2)]
    runs = [make_run(tmp_path, m, sp, s, 0.7 + 0.05 * s) for m, sp, s in grid]
    partition = tmp_path / "partitions" / "digits" / "dir0.1" / "seed0"
    partition.mkdir(parents=True)
    counts = pd.DataFrame([[5, 0], [1, 4]], index=pd.RangeIndex(2, name="client"), columns=["0", "1"])
    counts.to_csv(partition / "class_counts.csv")
    (partition / "heatmap.png").write_bytes(b"\x89PNG fake")
    out = report.build(runs, tmp_path / "out", partitions=[partition])
    for name in ["results.csv", "results.md", "results.tex", "claims.csv", "claims.md"]:
        assert (out / "tables" / name).stat().st_size > 0, name
    for name in ["val_acc_vs_round.png", "gate_agreement_vs_round.png", "best_acc_bars.png", "partitions.png"]:
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
    assert (out / "plots" / "partitions" / "digits_dir0.1_seed0.png").read_bytes() == b"\x89PNG fake"


def test_runs_missing_keys_and_curves_still_produce_tables(tmp_path):
    full = make_run(tmp_path, "fedavg", "iid", 0, 0.8)
    sparse = make_run(tmp_path, "fedsq", "iid", 0, 0.85)
    (sparse / "metrics.csv").unlink()
    summary = json.loads((sparse / "summary.json").read_text())
    for key in ("last3_val_acc", "rounds_to_target", "test_acc_at_best"):
        del summary[key]
    summary["tags"]["lr_mode"] = None  # unresolved: calibrated is the default
    del summary["tags"]["method"]  # method comes from the config
    (sparse / "summary.json").write_text(json.dumps(summary))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()

    gateless = pd.read_csv(full / "metrics.csv").assign(gate_agreement=np.nan)  # eval.drift_every: 0
    gateless.to_csv(full / "metrics.csv", index=False)

    with pytest.warns(UserWarning) as caught:
        report.build([full, sparse, unfinished], tmp_path / "out")
    messages = " ".join(str(w.message) for w in caught)
    assert "unfinished: no summary.json" in messages and "no gate agreement" in messages
    # The pipeline declares every plot as an output: one without data still exists and says so.
    assert (tmp_path / "out" / "plots" / "gate_agreement_vs_round.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(tmp_path / "out" / "tables" / "results.csv").set_index("method")
    assert table.loc["fedsq", "best_val_acc_mean"] == 0.85
    assert table.loc["fedsq", "lr_mode"] == "calibrated"
    assert np.isnan(table.loc["fedsq", "last3_val_acc_mean"])
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv")
    assert set(claims["verdict"]) == {"not enough seeds"}


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no run folders"):
        report.build([], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="none of the 1 run folders has a summary.json"):
        with pytest.warns(UserWarning):
            report.build([tmp_path], tmp_path / "out")


def test_grid_without_fedsq_gives_empty_claims_with_header(tmp_path):
    runs = [make_run(tmp_path, "fedavg", "iid", s, 0.8) for s in range(2)]
    report.build(runs, tmp_path / "out")
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv")
    assert claims.empty and list(claims.columns) == report.CLAIM_COLUMNS
    assert "verdict" in (tmp_path / "out" / "tables" / "claims.md").read_text()

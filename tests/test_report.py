"""Report: tables equal hand-computed seed statistics, paired claim verdicts, plots and robustness."""

import inspect
import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from fedsq import cli, report

SCHEMA = Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def make_run(
    root, method, split, seed, best=None, *, val=None, backbone="resnet18", lr_mode="calibrated", bn="pooled",
    rounds_to=None, rounds=5,
):
    """A run folder as the engine writes it: summary.json and metrics.csv.

    val_acc per round is `val` when given, else a straight rise from 0.1 to `best`.
    """
    folder = root / ("runs" if lr_mode == "calibrated" else "control") / f"bn-{bn}" / backbone / split / method
    folder = folder / f"seed{seed}"
    folder.mkdir(parents=True)
    val = np.linspace(0.1, best, rounds + 1) if val is None else np.asarray(val, dtype=float)
    pd.DataFrame(
        {
            "round": range(len(val)),
            "val_acc": val,
            "test_acc": val - 0.01,
            "gate_agreement": np.linspace(1.0, 0.8, len(val)),
            "gate_agreement_pretrained_bn": np.linspace(1.0, 0.95, len(val)),
        }
    ).to_csv(folder / "metrics.csv", index=False)
    best, best_round = float(val.max()), int(val.argmax())
    tags = dict(dataset="digits", backbone=backbone, split=split, method=method, seed=str(seed), lr_mode=lr_mode, bn=bn)
    content = {
        "best_val_acc": best,
        "best_round": best_round,
        "test_acc_at_best": best - 0.01,
        "final_val_acc": float(val[-1]),
        "final_test_acc": float(val[-1]) - 0.01,
        "last3_val_acc": float(val[-3:].mean()),
        "rounds_to_target": rounds_to if rounds_to is not None else {"0.6": 2, "0.7": None},
        "rounds": len(val) - 1,
        "tags": tags,
        "config": {"dataset": "digits", "backbone": backbone, "method": {"name": method}, "seed": seed},
    }
    (folder / "summary.json").write_text(json.dumps(content))
    return folder


def claims_of(runs, **kwargs):
    return report.claims_table(*report.load_runs(runs), **kwargs)


def pair_runs(root, split, fedsq, baseline, name="fedavg", **kwargs):
    """Run folders of FedSQ and one baseline, seed i with best val acc fedsq[i] / baseline[i]."""
    runs = [make_run(root, "fedsq", split, s, b, **kwargs) for s, b in enumerate(fedsq)]
    return runs + [make_run(root, name, split, s, b, **kwargs) for s, b in enumerate(baseline)]


def test_results_table_equals_hand_computed_statistics(tmp_path):
    bests = [0.80, 0.84, 0.90]
    reached = [2, 3, None]
    seeds = zip(range(3), bests, reached)
    runs = [make_run(tmp_path, "fedsq", "iid", s, b, rounds_to={"0.6": r, "0.7": None}) for s, b, r in seeds]
    runs.append(make_run(tmp_path, "fedavg", "iid", 0, 0.75))
    report.build(runs, tmp_path / "out")

    table = pd.read_csv(tmp_path / "out" / "tables" / "results.csv")
    fedsq = table[table["method"] == "fedsq"].iloc[0]
    assert fedsq["n_seeds"] == 3 and fedsq["bn"] == "pooled"
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
    ("fedsq", "fedavg", "verdict"),
    [
        # Half a point apart in every seed: significantly different, yet well inside ±1.5 points.
        ([0.900, 0.901, 0.902], [0.905, 0.906, 0.907], "supported"),
        ([0.900, 0.911, 0.897, 0.905], [0.905, 0.903, 0.902, 0.910], "supported"),
        ([0.60, 0.90], [0.55, 0.93], "too few seeds"),
        ([0.60, 0.90, 0.75], [0.55, 0.93, 0.80], "inconclusive"),  # seeds spread far wider than the margin
        ([0.80, 0.81, 0.82], [0.85, 0.87, 0.86], "contradicted"),  # 5 points apart in every seed
    ],
)
def test_iid_parity_is_an_equivalence_test_on_paired_seeds(tmp_path, fedsq, fedavg, verdict):
    claims = claims_of(pair_runs(tmp_path, "iid", fedsq, fedavg))
    row = claims[claims["claim"] == "iid_parity"].iloc[0]
    assert row["verdict"] == verdict
    diff = np.round(np.subtract(fedsq, fedavg), 12)
    assert row["n"] == len(fedsq)
    assert (row["fedsq_mean"], row["baseline_mean"]) == (pytest.approx(np.mean(fedsq)), pytest.approx(np.mean(fedavg)))
    assert row["diff_mean"] == pytest.approx(diff.mean())
    assert row["ci_level"] == pytest.approx(0.90)
    if len(fedsq) < 3:
        assert np.isnan(row["p"]) and np.isnan(row["ci_low"])
        return
    if np.ptp(diff) == 0:  # every seed the same difference: the interval is that difference
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(diff[0]), pytest.approx(diff[0]))
        return
    tost = max(
        stats.ttest_1samp(diff, -0.015, alternative="greater").pvalue,
        stats.ttest_1samp(diff, 0.015, alternative="less").pvalue,
    )
    ci = stats.ttest_rel(fedsq, fedavg).confidence_interval(0.90)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert row["p"] == pytest.approx(tost)
    # Supported exactly when the 90 % CI lies inside the margin (one parity row: Holm changes nothing).
    assert (row["verdict"] == "supported") == (-0.015 < ci.low and ci.high < 0.015)


def test_parity_is_read_from_each_rows_ci_without_holm(tmp_path):
    # Two parity rows (BatchNorm arms), each with its 90 % CI inside ±1.5 points: both hold,
    # however many rows the table has; a third whose CI lies beyond the margin contradicts.
    base = [0.80, 0.82, 0.84, 0.86, 0.88]
    runs = pair_runs(tmp_path, "iid", list(np.add(base, [0.001, 0.002, 0.0, 0.001, 0.003])), base, bn="pooled")
    runs += pair_runs(tmp_path, "iid", list(np.add(base, [-0.002, 0.0, 0.001, -0.001, 0.0])), base, bn="frozen")
    runs += pair_runs(tmp_path, "iid", list(np.add(base, [-0.05, -0.06, -0.055, -0.045, -0.05])), base, bn="local")
    rows = claims_of(runs).query("claim == 'iid_parity'").set_index("bn")
    assert dict(rows["verdict"]) == {"pooled": "supported", "frozen": "supported", "local": "contradicted"}
    assert rows["p_holm"].isna().all()


@pytest.mark.parametrize("reverse", [False, True])
def test_dirichlet_superiority_is_a_one_sided_paired_test(tmp_path, reverse):
    baseline = [0.60, 0.70, 0.65, 0.75, 0.68]
    fedsq = list(np.add(baseline, [0.04, 0.06, 0.05, 0.07, 0.03]))
    if reverse:
        fedsq, baseline = baseline, fedsq
    row = claims_of(pair_runs(tmp_path, "dir0.1", fedsq, baseline)).query("claim == 'dirichlet_robust'").iloc[0]
    assert row["verdict"] == ("contradicted" if reverse else "supported")
    # Checked against scipy's paired test on the raw accuracies (the report tests differences).
    better = stats.ttest_rel(fedsq, baseline, alternative="greater")
    worse = stats.ttest_rel(fedsq, baseline, alternative="less")
    ci = stats.ttest_rel(fedsq, baseline).confidence_interval(0.95)
    assert row["n"] == 5 and row["ci_level"] == pytest.approx(0.95)
    assert row["diff_mean"] == pytest.approx(np.mean(fedsq) - np.mean(baseline))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert (row["p"], row["p_reverse"]) == (pytest.approx(better.pvalue), pytest.approx(worse.pvalue))
    assert (row["p_holm"], row["p_reverse_holm"]) == (row["p"], row["p_reverse"])  # a family of one


def test_holm_turns_a_marginal_cell_inconclusive(tmp_path):
    baseline = [0.60, 0.70, 0.65, 0.75, 0.68]
    gains = {
        "dir0.1": [0.04, 0.06, 0.05, 0.07, 0.03],  # clear
        "dir0.5": [0.02, 0.01, 0.03, -0.005, 0.02],  # p ≈ 0.03 alone
        "dir1.0": [0.01, -0.02, 0.02, -0.01, 0.00],  # nothing
    }
    runs = []
    for split, gain in gains.items():
        runs += pair_runs(tmp_path, split, np.add(baseline, gain), baseline)
    rows = claims_of(runs).query("claim == 'dirichlet_robust'").set_index("split")
    p = {split: stats.ttest_1samp(gain, 0.0, alternative="greater").pvalue for split, gain in gains.items()}
    assert p["dir0.1"] < p["dir0.5"] < 0.05 < p["dir1.0"]
    assert rows["p"].to_dict() == pytest.approx(p)
    # Holm by hand: sorted p times 3, 2, 1, then running maximum.
    assert rows.loc["dir0.1", "p_holm"] == pytest.approx(3 * p["dir0.1"])
    assert rows.loc["dir0.5", "p_holm"] == pytest.approx(max(3 * p["dir0.1"], 2 * p["dir0.5"]))
    assert rows.loc["dir1.0", "p_holm"] == pytest.approx(min(1.0, max(2 * p["dir0.5"], p["dir1.0"])))
    assert rows.loc["dir0.5", "p_holm"] > 0.05
    assert rows["verdict"].to_dict() == {"dir0.1": "supported", "dir0.5": "inconclusive", "dir1.0": "inconclusive"}


def test_holm_adjustment():
    adjusted = report.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted 0.005, 0.01, 0.03, 0.04, NaN(=1) times 5, 4, 3, 2, 1 -> 0.025, 0.04, 0.09, 0.08 -> running max
    np.testing.assert_allclose(adjusted[:4], [0.04, 0.09, 0.09, 0.025])
    assert np.isnan(adjusted[4])


# Per seed: (FedSQ val_acc per round, baseline val_acc per round, rounds each needs to reach
# 0.95 × the lower of the two bests), worked out by hand.
ROUNDS_CASES = [
    ([0.2, 0.78, 0.8, 0.8], [0.2, 0.3, 0.5, 0.8], 1, 3),  # target 0.76
    ([0.2, 0.5, 0.8, 0.8], [0.2, 0.3, 0.6, 0.79], 2, 3),  # 0.75
    ([0.2, 0.9, 0.9, 0.9], [0.2, 0.3, 0.5, 0.6], 1, 3),  # the baseline's lower best sets 0.57
    ([0.2, 0.5, 0.78, 0.8], [0.2, 0.5, 0.6, 0.8], 2, 3),  # 0.76
    ([0.2, 0.8, 0.8, 0.8], [0.2, 0.5, 0.8, 0.8], 1, 2),  # 0.76
]


@pytest.mark.parametrize("reverse", [False, True])
def test_fewer_rounds_compares_rounds_to_a_common_target_per_seed(tmp_path, reverse):
    cases = [(b, a, rb, ra) for a, b, ra, rb in ROUNDS_CASES] if reverse else ROUNDS_CASES
    runs = []
    for seed, (fedsq, baseline, _, _) in enumerate(cases):
        runs.append(make_run(tmp_path, "fedsq", "dir0.5", seed, val=fedsq))
        runs.append(make_run(tmp_path, "fedavg", "dir0.5", seed, val=baseline))
    row = claims_of(runs).query("claim == 'fewer_rounds'").iloc[0]
    fedsq_rounds, baseline_rounds = [c[2] for c in cases], [c[3] for c in cases]
    assert (row["fedsq_mean"], row["baseline_mean"]) == (np.mean(fedsq_rounds), np.mean(baseline_rounds))
    assert row["measure"] == "rounds_to_target" and row["n"] == 5
    assert row["p"] == pytest.approx(stats.ttest_rel(fedsq_rounds, baseline_rounds, alternative="less").pvalue)
    ci = stats.ttest_rel(fedsq_rounds, baseline_rounds).confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert row["verdict"] == ("contradicted" if reverse else "supported")


@pytest.mark.parametrize("flat", ["fedavg", "fedsq"])
def test_a_run_that_never_improves_is_not_faster(tmp_path, flat):
    """Best at round 0 used to count as "best in 0 rounds": the flat method won fewer_rounds."""
    runs = []
    for seed in range(3):
        improving = [0.3, 0.5 + 0.05 * seed, 0.7, 0.8]
        never = [0.3, 0.25, 0.2 + 0.01 * seed, 0.22]  # best at round 0
        for method in ("fedsq", "fedavg"):
            runs.append(make_run(tmp_path, method, "dir0.1", seed, val=never if method == flat else improving))
    row = claims_of(runs).query("claim == 'fewer_rounds'").iloc[0]
    # Target 0.95 × 0.3: both runs reach it at round 0; neither is faster.
    assert (row["fedsq_mean"], row["baseline_mean"], row["diff_mean"]) == (0, 0, 0)
    assert row["verdict"] == "inconclusive"


def test_two_seeds_are_too_few(tmp_path):
    runs = pair_runs(tmp_path, "dir0.1", [0.90, 0.91], [0.60, 0.61])
    claims = claims_of(runs)
    assert list(claims["claim"]) == ["dirichlet_robust", "fewer_rounds"]
    assert set(claims["verdict"]) == {"too few seeds"} and (claims["n"] == 2).all()
    assert claims["p"].isna().all() and claims["p_holm"].isna().all()
    assert claims.iloc[0]["diff_mean"] == pytest.approx(0.30)  # the numbers are still shown


def test_seeds_are_paired_not_pooled(tmp_path):
    # Seed 3 of FedSQ has no baseline partner: it is left out, not compared with another seed.
    runs = pair_runs(tmp_path, "dir0.1", [0.70, 0.80, 0.90, 0.10], [0.69, 0.79, 0.88])
    row = claims_of(runs).query("claim == 'dirichlet_robust'").iloc[0]
    assert row["n"] == 3 and row["fedsq_mean"] == pytest.approx(0.80)
    paired = stats.ttest_rel([0.70, 0.80, 0.90], [0.69, 0.79, 0.88], alternative="greater")
    assert row["p"] == pytest.approx(paired.pvalue)
    assert row["verdict"] == "supported"


def test_claims_show_equal_lr_and_bn_controls_beside_calibrated(tmp_path):
    runs = []
    for lr_mode, bn, gap in [("calibrated", "pooled", 0.2), ("equal", "pooled", 0.0), ("calibrated", "frozen", 0.0)]:
        for method, shift in [("fedsq", gap), ("fedavg", 0.0), ("fedprox", 0.0)]:
            noise = [0.0, 0.01, -0.01] if method == "fedsq" else [0.0, 0.0, 0.0]
            runs += [
                make_run(tmp_path, method, "dir0.1", s, 0.6 + shift + 0.05 * s + noise[s], lr_mode=lr_mode, bn=bn)
                for s in range(3)
            ]
    report.build(runs, tmp_path / "out")
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv")
    robust = claims[claims["claim"] == "dirichlet_robust"]
    assert list(zip(robust["baseline"], robust["lr_mode"], robust["bn"], robust["verdict"])) == [
        ("fedavg", "calibrated", "pooled", "supported"),
        ("fedavg", "calibrated", "frozen", "inconclusive"),
        ("fedavg", "equal", "pooled", "inconclusive"),
        ("fedprox", "calibrated", "pooled", "supported"),
        ("fedprox", "calibrated", "frozen", "inconclusive"),
        ("fedprox", "equal", "pooled", "inconclusive"),
    ]
    # Holm over the six rows of the claim: the smallest p times 6.
    assert robust["p_holm"].min() == pytest.approx(min(1.0, 6 * robust["p"].min()))
    results = pd.read_csv(tmp_path / "out" / "tables" / "results.csv")
    arms = set(zip(results["lr_mode"], results["bn"]))
    assert arms == {("calibrated", "pooled"), ("equal", "pooled"), ("calibrated", "frozen")}
    markdown = (tmp_path / "out" / "tables" / "claims.md").read_text()
    assert "FedSQ > baseline under Dirichlet" in markdown and "| frozen |" in markdown


def test_bn_arm_from_the_tags_marks_the_other_policies(tmp_path):
    frozen = make_run(tmp_path, "fedsq", "iid", 0, 0.8, bn="frozen")
    pooled = make_run(tmp_path, "fedprox", "iid", 0, 0.8)
    runs, curves = report.load_runs([frozen, pooled])
    assert runs.set_index("method")["bn"].to_dict() == {"fedsq": "frozen", "fedprox": "pooled"}
    fig = report.plot_curves(curves, "val_acc", "validation accuracy")
    lines = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert lines == {"fedsq (bn frozen)": ":", "fedprox": "-"}


def test_claims_settings_reach_the_verdicts_through_the_cli(tmp_path):
    # FedSQ 3 points below FedAvg in every seed: outside ±1.5 points, inside ±5.
    runs = pair_runs(tmp_path, "iid", [0.80, 0.85, 0.90], [0.83, 0.88, 0.93])
    args = ["report", "--runs", *map(str, runs), "--out"]
    assert cli.main([*args, str(tmp_path / "default")]) == 0
    assert cli.main([*args, str(tmp_path / "wide"), "--parity-margin", "0.05", "--target-fraction", "0.9"]) == 0
    verdicts = {}
    for name in ("default", "wide"):
        claims = pd.read_csv(tmp_path / name / "tables" / "claims.csv")
        verdicts[name] = claims.set_index("claim").loc["iid_parity", "verdict"]
    assert verdicts == {"default": "contradicted", "wide": "supported"}
    default = (tmp_path / "default" / "tables" / "claims.md").read_text().splitlines()
    wide = (tmp_path / "wide" / "tables" / "claims.md").read_text().splitlines()
    assert default[0].startswith("Paired by seed") and default[1].startswith("Verdicts:") and default[2] == ""
    assert "±1.5 points" in default[1] and "95% of the" in default[0] and "p < 0.05" in default[1]
    assert "±5 points" in wide[1] and "90% of the" in wide[0]
    assert cli.main([*args, str(tmp_path / "bad"), "--alpha", "0.7"]) == 2


def test_schema_defaults_are_the_report_defaults():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["claims"]["properties"]
    defaults = inspect.signature(report.build).parameters
    pairs = {"parity_margin": "parity_margin", "rounds_target_fraction": "target_fraction", "alpha": "alpha"}
    for key, argument in pairs.items():
        assert schema[key]["default"] == defaults[argument].default, key


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
    assert set(claims["verdict"]) == {"too few seeds"}  # one seed a side


def test_claims_without_curves_still_test_accuracy(tmp_path):
    runs = pair_runs(tmp_path, "dir0.1", [0.80, 0.85, 0.90], [0.70, 0.74, 0.81])
    for run in runs:
        (run / "metrics.csv").unlink()
    with pytest.warns(UserWarning) as caught:  # the plots say so
        report.build(runs, tmp_path / "out")
    messages = " ".join(str(w.message) for w in caught)
    assert "no val_acc in any metrics.csv" in messages and "no gate agreement" in messages
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv").set_index("claim")
    assert claims.loc["dirichlet_robust", "verdict"] == "supported"
    assert (claims.loc["fewer_rounds", "n"], claims.loc["fewer_rounds", "verdict"]) == (0, "too few seeds")


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no run folders"):
        report.build([], tmp_path / "out")
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 0.5\), got 0.7"):
        report.build([tmp_path], tmp_path / "out", alpha=0.7)
    with pytest.raises(FileNotFoundError, match="none of the 1 run folders has a summary.json"):
        with pytest.warns(UserWarning):
            report.build([tmp_path], tmp_path / "out")


def test_grid_without_fedsq_gives_empty_claims_with_header(tmp_path):
    runs = [make_run(tmp_path, "fedavg", "iid", s, 0.8) for s in range(2)]
    report.build(runs, tmp_path / "out")
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv")
    assert claims.empty and list(claims.columns) == report.CLAIM_COLUMNS
    assert "verdict" in (tmp_path / "out" / "tables" / "claims.md").read_text()

"""Report and analysis: tables equal hand-computed seed statistics, each declared rule on synthetic runs, plots."""

import inspect
import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from fedsq import analysis, cli, report

SCHEMA = Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml"
# The records layout (runs/, control/, bn_control/) for the evidence grid's arms.
SECTIONS = {("calibrated", "pooled"): "runs", ("equal", "pooled"): "control", ("calibrated", "frozen"): "bn_control"}


def make_run(
    root, method, split, seed, best=None, *, val=None, test=None, backbone="resnet18", lr_mode="calibrated",
    bn="pooled", rounds_to=None, rounds=5, targets=(0.6, 0.7), correct=None,
):
    """A run folder as the engine writes it (records layout): summary.json and metrics.csv.

    val_acc per round is `val` when given, else a straight rise from 0.1 to `best`; test_acc is
    `test` when given, else val_acc − 0.01. rounds_to_target is worked out from val_acc and
    `targets` as the engine does, unless `rounds_to` gives it; `correct` is correct_at_best.
    """
    section = SECTIONS.get((lr_mode, bn), f"{lr_mode}-{bn}")
    folder = root / section / "digits" / backbone / split / method / f"seed{seed}"
    folder.mkdir(parents=True)
    val = np.linspace(0.1, best, rounds + 1) if val is None else np.asarray(val, dtype=float)
    test = val - 0.01 if test is None else np.asarray(test, dtype=float)
    pd.DataFrame(
        {
            "round": range(len(val)),
            "val_acc": val,
            "test_acc": test,
            "gate_agreement": np.linspace(1.0, 0.8, len(val)),
            "gate_agreement_pretrained_bn": np.linspace(1.0, 0.95, len(val)),
        }
    ).to_csv(folder / "metrics.csv", index=False)
    best, best_round = float(val.max()), int(val.argmax())
    if rounds_to is None:
        rounds_to = {str(t): next((r for r, v in enumerate(val) if v >= t), None) for t in targets}
    tags = dict(dataset="digits", backbone=backbone, split=split, method=method, seed=str(seed), lr_mode=lr_mode, bn=bn)
    content = {
        "best_val_acc": best,
        "best_round": best_round,
        "test_acc_at_best": float(test[best_round]),
        "final_val_acc": float(val[-1]),
        "final_test_acc": float(test[-1]),
        "last3_val_acc": float(val[-3:].mean()),
        "rounds_to_target": rounds_to,
        "rounds": len(val) - 1,
        "tags": tags,
        "config": {"dataset": "digits", "backbone": backbone, "method": {"name": method}, "seed": seed,
                   "eval": {"targets": list(targets)}},
    }
    if correct is not None:
        content["correct_at_best"] = correct
    (folder / "summary.json").write_text(json.dumps(content))
    return folder


def claims_of(runs, **kwargs):
    return analysis.claims_table(*report.load_runs(runs), **kwargs)


def pair_runs(root, split, fedsq, baseline, name="fedavg", **kwargs):
    """Run folders of FedSQ and one baseline, seed i with best val acc fedsq[i] / baseline[i]."""
    runs = [make_run(root, "fedsq", split, s, b, **kwargs) for s, b in enumerate(fedsq)]
    return runs + [make_run(root, name, split, s, b, **kwargs) for s, b in enumerate(baseline)]


def plateau(rise, top, rounds=12, start=0.1):
    """val_acc that climbs linearly from `start` to `top` over `rise` rounds, then stays there."""
    return np.minimum(top, start + (top - start) * np.arange(rounds + 1) / rise)


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
        # Half a point apart in every seed: inside ±1.5 points, but a constant difference has no
        # t-test; the sign-flip p decides, and with 3 seeds it cannot fall below 1/8.
        ([0.900, 0.901, 0.902], [0.905, 0.906, 0.907], "inconclusive"),
        ([0.900, 0.901, 0.902, 0.903, 0.904], [0.905, 0.906, 0.907, 0.908, 0.909], "supported"),  # p = 1/32
        ([0.900, 0.911, 0.897, 0.905], [0.905, 0.903, 0.902, 0.910], "supported"),
        ([0.60, 0.90], [0.55, 0.93], "too few seeds"),
        ([0.60, 0.90, 0.75], [0.55, 0.93, 0.80], "inconclusive"),  # seeds spread far wider than the margin
        ([0.80, 0.81, 0.82], [0.85, 0.87, 0.86], "contradicted"),  # 5 points apart in every seed
    ],
)
def test_iid_parity_is_an_equivalence_test_on_paired_seeds(tmp_path, fedsq, fedavg, verdict):
    claims = claims_of(pair_runs(tmp_path, "iid", fedsq, fedavg))
    row = claims.query("claim == 'iid_parity' and family == 'primary'").iloc[0]
    assert row["verdict"] == verdict and row["measure"] == "test_acc_at_best"
    diff = np.round(np.subtract(fedsq, fedavg), 12)
    assert row["n"] == len(fedsq)
    # make_run's test accuracy is val − 0.01: the means of the primary outcome.
    assert row["fedsq_mean"] == pytest.approx(np.mean(fedsq) - 0.01)
    assert row["baseline_mean"] == pytest.approx(np.mean(fedavg) - 0.01)
    assert row["diff_mean"] == pytest.approx(diff.mean())
    assert row["ci_level"] == pytest.approx(0.90)
    if len(fedsq) < 3:
        assert np.isnan(row["p"]) and np.isnan(row["ci_low"])
        return
    if np.ptp(diff) == 0:  # every seed the same difference: no t-test, the sign-flip p decides
        assert np.isnan(row["p_t"]) and row["p_by"] == "sign-flip"
        assert row["p"] == row["p_signflip"] == pytest.approx(1 / 2 ** len(diff))
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(diff[0]), pytest.approx(diff[0]))
        return
    tost = max(
        stats.ttest_1samp(diff, -0.015, alternative="greater").pvalue,
        stats.ttest_1samp(diff, 0.015, alternative="less").pvalue,
    )
    ci = stats.ttest_rel(fedsq, fedavg).confidence_interval(0.90)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert row["p"] == row["p_t"] == pytest.approx(tost) and row["p_by"] == "t"
    # Supported exactly when the 90 % CI lies inside the margin (TOST at alpha; never Holm-adjusted).
    assert (row["verdict"] == "supported") == (-0.015 < ci.low and ci.high < 0.015)
    assert np.isnan(row["p_holm"])


def test_parity_is_read_from_each_rows_ci_without_holm(tmp_path):
    # Two parity rows (BatchNorm arms), each with its 90 % CI inside ±1.5 points: both hold,
    # however many rows the table has; a third whose CI lies beyond the margin contradicts.
    base = [0.80, 0.82, 0.84, 0.86, 0.88]
    runs = pair_runs(tmp_path, "iid", list(np.add(base, [0.001, 0.002, 0.0, 0.001, 0.003])), base, bn="pooled")
    runs += pair_runs(tmp_path, "iid", list(np.add(base, [-0.002, 0.0, 0.001, -0.001, 0.0])), base, bn="frozen")
    runs += pair_runs(tmp_path, "iid", list(np.add(base, [-0.05, -0.06, -0.055, -0.045, -0.05])), base, bn="local")
    rows = claims_of(runs).query("claim == 'iid_parity' and measure == 'test_acc_at_best'").set_index("bn")
    assert dict(rows["verdict"]) == {"pooled": "supported", "frozen": "supported", "local": "contradicted"}
    assert dict(rows["family"]) == {"pooled": "primary", "frozen": "controls", "local": "controls"}
    assert rows["p_holm"].isna().all()


def test_parity_power_matches_a_simulation_and_smallest_margin_inverts_it():
    # The figures: paired sd 2.1 points, margin ±1.5 points.
    sd, margin = 0.021, 0.015
    assert analysis.parity_power(sd, 5, margin) == pytest.approx(0.09, abs=0.01)
    assert analysis.parity_power(sd, 20, margin) == pytest.approx(0.85, abs=0.02)
    # A seeded simulation of the 90 % t CI at a true difference of 0 agrees with the integral.
    rng = np.random.default_rng(1)
    for n in (5, 10):
        d = rng.normal(0.0, sd, size=(40_000, n))
        half = stats.t.ppf(0.95, n - 1) * d.std(axis=1, ddof=1) / np.sqrt(n)
        simulated = np.mean(np.abs(d.mean(axis=1)) + half < margin)
        assert analysis.parity_power(sd, n, margin) == pytest.approx(simulated, abs=0.01)
    smallest = analysis.smallest_margin(sd, 5)
    assert smallest > margin and analysis.parity_power(sd, 5, smallest) == pytest.approx(0.8, abs=1e-6)
    assert analysis.seeds_for_power(sd, margin) == 19  # 18 seeds fall short of 80 %, 19 reach it
    assert analysis.parity_power(sd, 18, margin) < 0.8 <= analysis.parity_power(sd, 19, margin)


def test_parity_row_reports_its_power_from_the_measured_sd(tmp_path):
    base = [0.80, 0.82, 0.84, 0.86, 0.88]
    gaps = [0.02, -0.01, 0.03, -0.02, 0.0]
    row = claims_of(pair_runs(tmp_path, "iid", np.add(base, gaps), base)).query(
        "claim == 'iid_parity' and family == 'primary'").iloc[0]
    sd = np.std(gaps, ddof=1)
    assert row["diff_sd"] == pytest.approx(sd)
    assert row["power"] == pytest.approx(analysis.parity_power(sd, 5, 0.015))
    assert row["smallest_margin"] == pytest.approx(analysis.smallest_margin(sd, 5))


@pytest.mark.parametrize("reverse", [False, True])
def test_dirichlet_superiority_is_a_one_sided_paired_test(tmp_path, reverse):
    baseline = [0.60, 0.70, 0.65, 0.75, 0.68]
    fedsq = list(np.add(baseline, [0.04, 0.06, 0.05, 0.07, 0.03]))
    if reverse:
        fedsq, baseline = baseline, fedsq
    claims = claims_of(pair_runs(tmp_path, "dir0.1", fedsq, baseline))
    row = claims.query("claim == 'dirichlet_robust' and family == 'primary'").iloc[0]
    assert row["verdict"] == ("contradicted" if reverse else "supported")
    # Checked against scipy's paired test on the raw accuracies (the report tests differences).
    better = stats.ttest_rel(fedsq, baseline, alternative="greater")
    worse = stats.ttest_rel(fedsq, baseline, alternative="less")
    assert row["n"] == 5 and row["ci_level"] == pytest.approx(0.95)
    assert row["diff_mean"] == pytest.approx(np.mean(fedsq) - np.mean(baseline))
    # A one-sided bound beside the one-sided test: the 95 % lower bound, no upper end.
    assert row["ci_low"] == pytest.approx(better.confidence_interval(0.95).low) and np.isnan(row["ci_high"])
    assert (row["p"], row["p_reverse"]) == (pytest.approx(better.pvalue), pytest.approx(worse.pvalue))
    assert (row["p_holm"], row["p_reverse_holm"]) == (row["p"], row["p_reverse"])  # a family of one
    # The exact sign-flip p: all 32 sign patterns; the observed one (all positive) is the most extreme.
    assert row["p_signflip"] == pytest.approx(1 / 32 if not reverse else 1.0)
    shown = analysis.claims_display(claims.query("family == 'primary'")).iloc[0]
    assert shown["t bound / CI"] == f"95% lower bound {100 * row['ci_low']:+.1f}"


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
    rows = claims_of(runs).query("claim == 'dirichlet_robust' and family == 'primary'").set_index("split")
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
    adjusted = analysis.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted 0.005, 0.01, 0.03, 0.04, NaN(=1) times 5, 4, 3, 2, 1 -> 0.025, 0.04, 0.09, 0.08 -> running max
    np.testing.assert_allclose(adjusted[:4], [0.04, 0.09, 0.09, 0.025])
    assert np.isnan(adjusted[4])


def test_primary_and_secondary_outcomes_are_separate_holm_families(tmp_path):
    """Test acc at best decides the primary family; best val acc is tested in its own family."""
    baseline = [0.60, 0.70, 0.65, 0.75, 0.68]
    test_gains = {"dir0.1": [0.04, 0.06, 0.05, 0.07, 0.03], "dir0.5": [0.02, 0.01, 0.03, -0.005, 0.02]}
    val_gains = {"dir0.1": [0.01, -0.02, 0.02, -0.01, 0.00], "dir0.5": [0.05, 0.06, 0.04, 0.05, 0.07]}
    runs = []
    for split in test_gains:
        for seed, b in enumerate(baseline):
            fedsq_val = plateau(4, b + val_gains[split][seed], rounds=8)
            base_val = plateau(4, b, rounds=8)
            # Test accuracy at the best round: its own gain, so the two outcomes disagree.
            runs.append(make_run(tmp_path, "fedsq", split, seed, val=fedsq_val,
                                 test=base_val - 0.02 + test_gains[split][seed]))
            runs.append(make_run(tmp_path, "fedavg", split, seed, val=base_val, test=base_val - 0.02))
    claims = claims_of(runs).query("claim == 'dirichlet_robust'")
    for family, outcome, gains in [("primary", "test_acc_at_best", test_gains), ("secondary", "best_val_acc", val_gains)]:
        rows = claims[claims["family"] == family].set_index("split")
        assert set(rows["measure"]) == {outcome}
        p = [stats.ttest_1samp(gains[split], 0.0, alternative="greater").pvalue for split in rows.index]
        np.testing.assert_allclose(rows["p"], p)
        np.testing.assert_allclose(rows["p_holm"], analysis.holm(p))  # two rows, not four
    # dir0.5's primary p ≈ 0.03 holds in a family of two; pooled with the secondary rows it would not.
    primary = claims[claims["family"] == "primary"].set_index("split")
    assert primary["verdict"].to_dict() == {"dir0.1": "supported", "dir0.5": "supported"}
    pooled = analysis.holm(claims["p"].to_numpy(float))
    assert pooled[((claims["family"] == "primary") & (claims["split"] == "dir0.5")).to_numpy()][0] > 0.05


def test_a_constant_difference_gets_the_sign_flip_p_not_zero(tmp_path):
    baseline = [0.60, 0.70, 0.65, 0.75, 0.68]
    row = claims_of(pair_runs(tmp_path, "dir0.1", np.add(baseline, 0.03), baseline)).query(
        "claim == 'dirichlet_robust' and family == 'primary'").iloc[0]
    assert np.isnan(row["p_t"]) and row["p"] > 0
    assert row["p"] == row["p_signflip"] == pytest.approx(1 / 2**5) and row["p_by"] == "sign-flip"
    assert row["verdict"] == "supported"  # 1/32 < 0.05, a family of one
    shown = analysis.claims_display(pd.DataFrame([row])).iloc[0]
    assert shown["p (t)"] == "–" and shown["p (sign-flip)"] == "0.031"


def test_a_duplicate_run_is_an_error_naming_both_folders(tmp_path):
    runs = pair_runs(tmp_path / "first", "dir0.1", [0.8, 0.82, 0.84], [0.7, 0.72, 0.74])
    again = make_run(tmp_path / "second", "fedavg", "dir0.1", 1, 0.9)
    with pytest.raises(ValueError, match="two runs of digits/resnet18/dir0.1/fedavg/calibrated/pooled/1") as error:
        report.load_runs([*runs, again])
    assert str(runs[4]) in str(error.value) and str(again) in str(error.value)
    loaded = report.load_runs(runs)
    duplicated = loaded[0].assign(run_dir=lambda f: f["run_dir"] + "-copy")
    with pytest.raises(ValueError, match="-copy"):
        analysis.claims_table(pd.concat([loaded[0], duplicated]), loaded[1])


def test_bootstrap_over_test_images_widens_the_interval(tmp_path):
    rng = np.random.default_rng(0)
    images = 300
    baseline = [0.60, 0.70, 0.65, 0.75, 0.68]
    gains = [0.04, 0.06, 0.05, 0.07, 0.03]
    runs = []
    for seed, (b, gain) in enumerate(zip(baseline, gains)):
        for method, acc in [("fedavg", b), ("fedsq", b + gain)]:
            flags = "".join("1" if hit else "0" for hit in rng.random(images) < acc)
            correct = {"val": flags, "test": flags}
            runs.append(make_run(tmp_path / "images", method, "dir0.1", seed, acc, correct=correct))
            runs.append(make_run(tmp_path / "seeds", method, "dir0.1", seed, acc))
    rows = {}
    for name in ("images", "seeds"):
        folders = [r for r in runs if name in r.parts]
        rows[name] = claims_of(folders).query("claim == 'dirichlet_robust' and family == 'primary'").iloc[0]
    assert rows["images"]["boot_over"] == "seeds × test images" and rows["seeds"]["boot_over"] == "seeds"
    # The same seeds and the same t-test; the bootstrap's lower bound sinks with the images' sampling error.
    assert rows["images"]["p"] == rows["seeds"]["p"]
    assert rows["images"]["boot_low"] < rows["seeds"]["boot_low"] - 0.01
    # Over seeds only, the bootstrap's draws are resampled seed means: its bound lies within their range.
    assert min(gains) <= rows["seeds"]["boot_low"] <= np.mean(gains)
    boot = analysis.paired_bootstrap(np.array(gains), None)
    assert rows["seeds"]["boot_low"] == pytest.approx(np.quantile(boot, 0.05))


def test_fast_low_is_not_fewer_rounds_against_slow_high(tmp_path):
    """FedSQ rises fast to 0.85, FedAvg slowly to 0.90: accuracy contradicted, fewer rounds not supported."""
    runs = []
    for seed in range(5):
        fedsq = plateau(2 + seed % 2, 0.85 + 0.002 * seed, rounds=24)
        fedavg = plateau(10 + seed % 3, 0.90 + 0.003 * seed, rounds=24)
        runs.append(make_run(tmp_path, "fedsq", "dir0.1", seed, val=fedsq, targets=(0.5, 0.8)))
        runs.append(make_run(tmp_path, "fedavg", "dir0.1", seed, val=fedavg, targets=(0.5, 0.8)))
    claims = claims_of(runs).set_index(["family", "claim", "measure"])
    assert claims.loc[("primary", "dirichlet_robust", "test_acc_at_best"), "verdict"] == "contradicted"
    for measure in ("rounds_to_0.5", "rounds_to_0.8"):
        row = claims.loc[("speed", "fewer_rounds", measure)]
        assert row["fedsq_mean"] < row["baseline_mean"] and row["p_holm"] < 0.05  # faster, significantly
        assert row["noninferior"] == False  # noqa: E712 (numpy bool)
        assert row["verdict"] == "not supported (accuracy worse)"
    # Both arms are flat over their last quarter: round of best is tested, and not supported either.
    best = claims.loc[("speed", "fewer_rounds", "best_round")]
    assert best["n"] == 5 and best["verdict"] == "not supported (accuracy worse)"


def test_a_run_that_never_reaches_a_target_is_censored_at_the_budget(tmp_path):
    runs = []
    fedsq_reach = [3, 3, 4, 3, 4]
    for seed in range(5):
        fedsq = plateau(fedsq_reach[seed] - 1, 0.95 + 0.001 * seed, rounds=10, start=0.45)
        # The baseline ends below 0.9 in four seeds and crosses it at round 8 in the last.
        fedavg = plateau(12, 0.88 + 0.002 * seed, rounds=10, start=0.45) if seed < 4 else plateau(8, 0.91, rounds=10, start=0.45)
        runs.append(make_run(tmp_path, "fedsq", "dir0.1", seed, val=fedsq, targets=(0.9, 0.99)))
        runs.append(make_run(tmp_path, "fedavg", "dir0.1", seed, val=fedavg, targets=(0.9, 0.99)))
    claims = claims_of(runs).query("family == 'speed'").set_index("measure")
    row = claims.loc["rounds_to_0.9"]
    fedsq_rounds = [next(r for r, v in enumerate(plateau(k - 1, 0.95, 10, 0.45)) if v >= 0.9) for k in fedsq_reach]
    baseline_rounds = [11, 11, 11, 11, 8]  # censored at the 10-round budget: counted as round 11
    assert (row["fedsq_censored"], row["baseline_censored"]) == (0, 4)
    assert row["baseline_mean"] == pytest.approx(np.mean(baseline_rounds))
    assert row["p"] == pytest.approx(stats.ttest_rel(fedsq_rounds, baseline_rounds, alternative="less").pvalue)
    assert row["verdict"] == "supported"
    # No run of either arm reached 0.99: no test, the row says so.
    unreached = claims.loc["rounds_to_0.99"]
    assert unreached["verdict"] == "not reached" and np.isnan(unreached["p"])
    assert (unreached["fedsq_censored"], unreached["baseline_censored"]) == (5, 5)
    shown = analysis.claims_display(claims.reset_index()).set_index("measure")
    assert shown.loc["rounds to 90%", "baseline mean"] == f"{np.mean(baseline_rounds):.1f} (4 censored)"


def test_round_of_best_is_tested_only_where_both_arms_flattened(tmp_path):
    runs = pair_runs(tmp_path, "dir0.1", [0.80, 0.85, 0.90], [0.70, 0.74, 0.81])  # straight rises
    claims = claims_of(runs).set_index(["family", "measure"])
    best = claims.loc[("speed", "best_round")]
    assert best["verdict"] == "not tested (not flat)" and np.isnan(best["p"])
    # Every arm still rises: named, and its verdicts bound to the budget.
    primary = claims.loc[("primary", "test_acc_at_best")]
    assert primary["budget_bound"] and "dir0.1 fedsq (tuned lr, pooled BN)" in primary["rising"]
    shown = analysis.claims_display(claims.reset_index().query("family == 'primary'")).iloc[0]
    assert shown["verdict"] == f"{primary['verdict']} (budget-bound)"


def test_last_quarter_gain_is_the_rise_over_the_last_quarter_of_rounds(tmp_path):
    rising = make_run(tmp_path, "fedsq", "iid", 0, val=np.linspace(0.1, 0.9, 9))  # 0.1 per round
    flat = make_run(tmp_path, "fedavg", "iid", 0, val=plateau(3, 0.8, rounds=8))
    gains = analysis.last_quarter_gain(report.load_runs([rising, flat])[1])
    # 8 rounds: the last quarter is rounds 7-8, the one before 5-6: two rounds apart.
    assert gains.xs("fedsq", level="method").item() == pytest.approx(0.2)
    assert gains.xs("fedavg", level="method").item() == pytest.approx(0.0)


def test_a_control_whose_gain_shrinks_is_a_supported_difference_in_differences(tmp_path):
    baseline = [0.60, 0.70, 0.65, 0.75, 0.68]
    arms = {  # (lr_mode, bn): FedSQ's gain over the baseline per seed
        ("calibrated", "pooled"): [0.10, 0.12, 0.09, 0.11, 0.10],
        ("equal", "pooled"): [0.01, 0.02, 0.00, 0.015, 0.01],  # the gain shrinks
        ("calibrated", "frozen"): [0.11, 0.10, 0.10, 0.12, 0.09],  # it does not
    }
    runs = []
    for (lr_mode, bn), gains in arms.items():
        runs += pair_runs(tmp_path, "dir0.1", np.add(baseline, gains), baseline, lr_mode=lr_mode, bn=bn)
    claims = claims_of(runs)
    did = claims[claims["claim"] == "control_gain_shrinks"].set_index("lr_mode")
    assert set(did["family"]) == {"control DiD"}
    d = np.subtract(arms[("equal", "pooled")], arms[("calibrated", "pooled")])
    assert did.loc["equal", "diff_mean"] == pytest.approx(d.mean())
    p = stats.ttest_1samp(d, 0.0, alternative="less").pvalue
    d_frozen = np.subtract(arms[("calibrated", "frozen")], arms[("calibrated", "pooled")])
    p_frozen = stats.ttest_1samp(d_frozen, 0.0, alternative="less").pvalue
    holm = analysis.holm([p, p_frozen])  # its own family of two
    assert did["p_holm"].to_dict() == {"equal": pytest.approx(holm[0]), "calibrated": pytest.approx(holm[1])}
    assert did.loc["equal", "verdict"] == "supported" and did.loc["calibrated", "verdict"] == "inconclusive"
    assert np.isnan(did.loc["equal", "ci_low"]) and did.loc["equal", "ci_high"] < 0  # a 95 % upper bound
    # The controls' own superiority rows: Holm over the two controls only, the primary row untouched.
    robust = claims.query("claim == 'dirichlet_robust' and measure == 'test_acc_at_best'").set_index("family")
    assert robust.loc["primary", "p_holm"] == pytest.approx(robust.loc["primary", "p"])
    controls = robust.loc[["controls"]]
    np.testing.assert_allclose(controls["p_holm"], analysis.holm(controls["p"].to_numpy()))


def test_difference_in_differences_bootstraps_the_same_test_images_in_all_four_runs(tmp_path):
    rng = np.random.default_rng(2)
    runs = []
    for seed in range(4):
        for lr_mode, accuracies in [("calibrated", {"fedsq": 0.8, "fedavg": 0.7}), ("equal", {"fedsq": 0.7, "fedavg": 0.7})]:
            for method, acc in accuracies.items():
                flags = "".join("1" if hit else "0" for hit in rng.random(200) < acc + 0.01 * seed)
                runs.append(make_run(tmp_path, method, "dir0.1", seed, acc + 0.01 * seed + 0.002 * (method == "fedsq"),
                                     lr_mode=lr_mode, correct={"val": flags, "test": flags}))
    row = claims_of(runs).query("claim == 'control_gain_shrinks'").iloc[0]
    assert row["boot_over"] == "seeds × test images"
    # The summaries' gains shrink by exactly 10 points in every seed (no spread: the bound is −10);
    # the per-image (control gain) − (primary gain) over 200 images adds their sampling error.
    assert row["ci_high"] < 0 and row["boot_high"] > row["ci_high"] + 0.01


def test_two_seeds_are_too_few(tmp_path):
    runs = pair_runs(tmp_path, "dir0.1", [0.90, 0.91], [0.60, 0.61])
    claims = claims_of(runs)
    assert set(claims["verdict"]) <= {"too few seeds", "not reached"} and (claims["n"] == 2).all()
    assert claims["p"].isna().all() and claims["p_holm"].isna().all()
    primary = claims.query("family == 'primary'").iloc[0]
    assert primary["diff_mean"] == pytest.approx(0.30)  # the numbers are still shown


def test_seeds_are_paired_not_pooled(tmp_path):
    # Seed 3 of FedSQ has no baseline partner: it is left out, not compared with another seed.
    runs = pair_runs(tmp_path, "dir0.1", [0.70, 0.80, 0.90, 0.10], [0.69, 0.79, 0.88])
    row = claims_of(runs).query("claim == 'dirichlet_robust' and family == 'primary'").iloc[0]
    assert row["n"] == 3 and row["fedsq_mean"] == pytest.approx(0.80 - 0.01)
    paired = stats.ttest_rel([0.70, 0.80, 0.90], [0.69, 0.79, 0.88], alternative="greater")
    assert row["p"] == pytest.approx(paired.pvalue)
    assert row["verdict"] == "supported"


def test_claims_show_equal_lr_and_bn_controls_beside_calibrated(tmp_path):
    runs = []
    for lr_mode, bn, gap in [("calibrated", "pooled", 0.2), ("equal", "pooled", 0.0), ("calibrated", "frozen", 0.0)]:
        for method, shift in [("fedsq", gap), ("fedavg", 0.0), ("fedprox", 0.0)]:
            # FedSQ's seeds vary differently in each arm, so no difference-in-differences is constant.
            noise = [0.0, 0.0, 0.0] if method != "fedsq" else [0.0, 0.01, -0.01] if gap else [0.005, -0.01, 0.0]
            runs += [
                make_run(tmp_path, method, "dir0.1", s, 0.6 + shift + 0.05 * s + noise[s], lr_mode=lr_mode, bn=bn)
                for s in range(3)
            ]
    report.build(runs, tmp_path / "out")
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv")
    robust = claims[(claims["claim"] == "dirichlet_robust") & (claims["measure"] == "test_acc_at_best")]
    assert list(zip(robust["family"], robust["baseline"], robust["lr_mode"], robust["bn"], robust["verdict"])) == [
        ("primary", "fedavg", "calibrated", "pooled", "supported"),
        ("primary", "fedprox", "calibrated", "pooled", "supported"),
        ("controls", "fedavg", "calibrated", "frozen", "inconclusive"),
        ("controls", "fedavg", "equal", "pooled", "inconclusive"),
        ("controls", "fedprox", "calibrated", "frozen", "inconclusive"),
        ("controls", "fedprox", "equal", "pooled", "inconclusive"),
    ]
    # Holm within each family: the primary rows are adjusted over two, the controls over four.
    for family, m in [("primary", 2), ("controls", 4)]:
        rows = robust[robust["family"] == family]
        assert rows["p_holm"].min() == pytest.approx(min(1.0, m * rows["p"].min()))
    did = claims[claims["claim"] == "control_gain_shrinks"]
    assert len(did) == 4 and set(did["verdict"]) == {"supported"}  # the 20-point gain vanishes under both
    results = pd.read_csv(tmp_path / "out" / "tables" / "results.csv")
    arms = set(zip(results["lr_mode"], results["bn"]))
    assert arms == {("calibrated", "pooled"), ("equal", "pooled"), ("calibrated", "frozen")}
    markdown = (tmp_path / "out" / "tables" / "claims.md").read_text()
    assert "FedSQ > baseline under Dirichlet" in markdown and "| BatchNorm control " in markdown


def test_bn_arm_from_the_tags_marks_the_other_policies(tmp_path):
    frozen = make_run(tmp_path, "fedsq", "iid", 0, 0.8, bn="frozen")
    pooled = make_run(tmp_path, "fedprox", "iid", 0, 0.8)
    runs, curves = report.load_runs([frozen, pooled])
    assert runs.set_index("method")["bn"].to_dict() == {"fedsq": "frozen", "fedprox": "pooled"}
    fig = report.plot_curves(curves, "val_acc", "validation accuracy")
    lines = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert lines == {"fedsq (bn frozen)": ":", "fedprox": "-"}


def test_claims_settings_reach_the_verdicts_through_the_cli(tmp_path):
    # FedSQ about 3 points below FedAvg in every seed: outside ±1.5 points, inside ±5.
    runs = pair_runs(tmp_path, "iid", [0.80, 0.85, 0.90], [0.83, 0.885, 0.925])
    args = ["report", "--runs", *map(str, runs), "--out"]
    assert cli.main([*args, str(tmp_path / "default")]) == 0
    assert cli.main([*args, str(tmp_path / "wide"), "--parity-margin", "0.05", "--flat-points", "0.5"]) == 0
    verdicts = {}
    for name in ("default", "wide"):
        claims = pd.read_csv(tmp_path / name / "tables" / "claims.csv").query("family == 'primary'")
        verdicts[name] = claims.set_index("claim").loc["iid_parity", "verdict"]
        # A straight rise of about 16 points per round: not flat at 1 point, flat at 50.
        assert claims["budget_bound"].all() == (name == "default")
    assert verdicts == {"default": "contradicted", "wide": "supported"}
    default = (tmp_path / "default" / "tables" / "claims.md").read_text()
    wide = (tmp_path / "wide" / "tables" / "claims.md").read_text()
    assert default.startswith("- **Outcomes.**") and "\n\n| family" in default
    assert default.split("\n\n")[0] == analysis.declared_analysis(0.015, 0.01, 0.05)
    assert "±1.5 points" in default and "by 1 point(s) or more" in default and "α = 0.05" in default
    assert "±5 points" in wide and "by 50 point(s) or more" in wide
    assert cli.main([*args, str(tmp_path / "bad"), "--alpha", "0.7"]) == 2


def test_schema_defaults_are_the_report_defaults():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["claims"]["properties"]
    defaults = inspect.signature(report.build).parameters
    assert set(schema) == {"parity_margin", "flat_points", "alpha"}
    for key in schema:
        assert schema[key]["default"] == defaults[key].default, key
    for function in (analysis.claims_table, analysis.declared_analysis):
        for key, parameter in inspect.signature(function).parameters.items():
            if key in schema and parameter.default is not inspect.Parameter.empty:
                assert parameter.default == schema[key]["default"], (function.__name__, key)


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
    claims = pd.read_csv(tmp_path / "out" / "tables" / "claims.csv").set_index(["family", "measure"])
    assert claims.loc[("primary", "test_acc_at_best"), "verdict"] == "supported"
    # Rounds to target come from summary.json; round of best needs the curves to know both arms flattened.
    assert claims.loc[("speed", "rounds_to_0.6"), "n"] == 3
    assert claims.loc[("speed", "best_round"), "verdict"] == "not tested (not flat)"


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
    assert claims.empty and list(claims.columns) == analysis.CLAIM_COLUMNS
    assert "verdict" in (tmp_path / "out" / "tables" / "claims.md").read_text()

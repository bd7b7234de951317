"""The declared analysis: every rule that turns finished runs into claim verdicts.

One home for the rules, so that a reader finds them all here and the README's "how to read
the claims" text (``declared_analysis``) is generated from the same definitions.

- Outcomes: the PRIMARY outcome is test accuracy at the best-validation round
  (``test_acc_at_best``); best validation accuracy (``best_val_acc``) is SECONDARY, tested in
  rows and a Holm family of its own.
- Arms: each method at its tuned lr (``lr_mode`` calibrated) with pooled BatchNorm is the
  primary arm; ``lr_mode`` equal (equal-lr control) and ``bn`` frozen (BatchNorm control) are
  controls.
- Families, each Holm-adjusted on its own: primary (primary arm, primary outcome), secondary
  (primary arm, secondary outcome), controls (control arms, primary outcome), control DiD
  (does the gain shrink under a control?), speed and speed controls (rounds).
- Pairing: the methods of one seed share partition and client sampling, so every test is on
  the per-seed differences FedSQ − baseline. Two runs of one arm and seed are an error.
- Tests: superiority and speed are one-sided paired t-tests with a one-sided bound at
  1 − alpha; parity is TOST within ± ``parity_margin`` with a two-sided (1 − 2 alpha) CI.
  Beside each: an exact sign-flip p and a paired bootstrap CI over seeds and test images.
  The t-test p decides; where it is undefined (a constant difference) the sign-flip p does.
- Speed: rounds to each fixed target (a run that never reaches it is censored at the budget,
  counted as budget + 1), and round of best where both arms flattened. "Fewer rounds" is
  supported only where FedSQ is non-inferior on the primary outcome.
- Convergence: an arm whose validation accuracy still rose by ``flat_points`` or more over the
  last quarter of rounds is named, and the verdicts that involve it are budget-bound.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import integrate, optimize, stats

GROUP = ["dataset", "backbone", "split", "method", "lr_mode", "bn"]
CELL = [key for key in GROUP if key != "method"]  # the claims compare methods within one cell
PRIMARY, SECONDARY = "test_acc_at_best", "best_val_acc"
OUTCOMES = {PRIMARY: "test acc at best val round", SECONDARY: "best val acc"}
# summary.json's correct_at_best key holding the per-image correctness behind each outcome.
IMAGES = {PRIMARY: "correct_test", SECONDARY: "correct_val"}
PRIMARY_ARM = ("calibrated", "pooled")  # (lr_mode, bn)
CONTROLS = {("equal", "pooled"): "equal-lr control", ("calibrated", "frozen"): "BatchNorm control"}
CLAIMS = {
    "iid_parity": "FedSQ ≈ FedAvg on i.i.d.",
    "dirichlet_robust": "FedSQ > baseline under Dirichlet",
    "control_gain_shrinks": "the gain shrinks under the control",
    "fewer_rounds": "FedSQ needs fewer rounds",
}
FAMILIES = ["primary", "secondary", "controls", "control DiD", "speed", "speed controls"]
MIN_SEEDS = 3  # paired seeds below which no test is run
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # fixed: the same records give the same table
SIGN_FLIPS = 2**16  # exact for n <= 16 seeds, else this many seeded random sign patterns
SUPPORTED, CONTRADICTED, INCONCLUSIVE, TOO_FEW = "supported", "contradicted", "inconclusive", "too few seeds"
NOT_REACHED, NOT_FLAT = "not reached", "not tested (not flat)"
NOT_NONINFERIOR = "not supported (accuracy worse)"
CLAIM_COLUMNS = [
    "family", "claim", "measure", "dataset", "backbone", "split", "baseline", "lr_mode", "bn", "n",
    "fedsq_mean", "baseline_mean", "fedsq_censored", "baseline_censored", "diff_mean", "diff_sd",
    "ci_level", "ci_low", "ci_high", "boot_low", "boot_high", "boot_over",
    "p_t", "p_signflip", "p", "p_by", "p_holm", "p_reverse", "p_reverse_holm",
    "noninferior", "power", "smallest_margin", "rising", "budget_bound", "verdict",
]


# --- input rules -----------------------------------------------------------------------------


def reject_duplicates(runs: pd.DataFrame) -> None:
    """Two runs of one arm and seed would be silently averaged into one pair: an error instead."""
    keys = [*GROUP, "seed"]
    duplicated = runs[runs.duplicated(keys, keep=False)]
    for arm, group in duplicated.groupby(keys):
        folders = " and ".join(group["run_dir"])
        raise ValueError(f"report: two runs of {'/'.join(map(str, arm))}: {folders}; keep one")


def last_quarter_gain(curves: pd.DataFrame) -> pd.Series:
    """Per arm (GROUP): mean over seeds of (mean val acc over the last quarter of rounds − over the
    quarter before), as a fraction. Near zero: the curve has flattened."""
    if curves.empty or "val_acc" not in curves:
        return pd.Series(dtype=float, index=pd.MultiIndex.from_arrays([[]] * len(GROUP), names=GROUP))
    curves = curves.dropna(subset=["val_acc"])
    keys = [*GROUP, "seed"]
    last_round = curves.groupby(keys)["round"].transform("max")
    quarter = np.maximum(1, last_round // 4)
    late = curves["round"] > last_round - quarter
    before = (curves["round"] > last_round - 2 * quarter) & ~late
    gain = curves[late].groupby(keys)["val_acc"].mean() - curves[before].groupby(keys)["val_acc"].mean()
    return gain.groupby(GROUP).mean()


# --- tests -----------------------------------------------------------------------------------


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of one family of p-values; a NaN p counts as 1 and stays NaN."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    order = np.argsort(np.nan_to_num(p, nan=1.0), kind="stable")
    scaled = (m - np.arange(m)) * np.nan_to_num(p[order], nan=1.0)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    adjusted[np.isnan(p)] = np.nan
    return adjusted


def sign_flip_p(d: np.ndarray, alternative: str) -> float:
    """Exact sign-flip p of the mean of paired differences against 0 (all 2^n sign patterns;
    a seeded random subset above 16 seeds). Never below 1/2^n, unlike a t-test on a constant."""
    result = stats.permutation_test(
        (np.asarray(d, dtype=float),), lambda x, axis: np.mean(x, axis=axis), vectorized=True,
        permutation_type="samples", alternative=alternative, n_resamples=SIGN_FLIPS, rng=BOOTSTRAP_SEED,
    )
    return float(result.pvalue)


def paired_bootstrap(
    d: np.ndarray, images: list[np.ndarray] | None, n_resamples: int = BOOTSTRAP_RESAMPLES
) -> np.ndarray:
    """Bootstrap distribution of the mean paired difference over seeds, and within each drawn seed
    over its test images where per-image differences are given (both arms were evaluated on the
    same images, so one draw of image indices serves both). Seeded: the same input, the same draws."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(d)
    drawn = rng.integers(0, n, size=(n_resamples, n))
    if images is None:
        return np.asarray(d, dtype=float)[drawn].mean(axis=1)
    means = np.empty((n_resamples, n))
    for j in range(n):
        for seed, per_image in enumerate(images):
            rows = np.flatnonzero(drawn[:, j] == seed)
            drawn_images = rng.integers(0, len(per_image), size=(len(rows), len(per_image)))
            means[rows, j] = per_image[drawn_images].mean(axis=1)
    return means.mean(axis=1)


def parity_power(sd: float, n: int, margin: float, alpha: float = 0.05) -> float:
    """Chance that the (1 − 2 alpha) t CI of n paired differences lies inside ± margin when the
    true mean difference is 0 and their sd is ``sd``: the mean is normal, the sample sd follows
    sd·chi(n − 1)/sqrt(n − 1), and the CI is inside when |mean| < margin − t·s/sqrt(n)."""
    if n < 2 or sd <= 0:
        raise ValueError(f"parity_power: needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    t = stats.t.ppf(1 - alpha, n - 1)
    se = sd / np.sqrt(n)
    chi = stats.chi(n - 1)

    def inside_given(x: float) -> float:  # x = sqrt(n − 1)·s/sd
        room = margin - t * se * x / np.sqrt(n - 1)
        return (2 * stats.norm.cdf(room / se) - 1) * chi.pdf(x)

    x_max = margin * np.sqrt(n - 1) / (t * se)  # beyond it the CI is wider than the margin
    return float(integrate.quad(inside_given, 0.0, x_max, limit=200)[0])


def smallest_margin(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest parity margin that n paired seeds of this sd establish with ``power``."""
    high = sd
    while parity_power(sd, n, high, alpha) < power:
        high *= 2
    return float(optimize.brentq(lambda m: parity_power(sd, n, m, alpha) - power, 1e-9 * sd, high, xtol=1e-9))


def seeds_for_power(sd: float, margin: float, alpha: float = 0.05, power: float = 0.8, most: int = 1000) -> int | None:
    """The fewest paired seeds whose parity test passes with ``power`` at a true difference of 0."""
    return next((n for n in range(2, most + 1) if parity_power(sd, n, margin, alpha) >= power), None)


def _paired_test(d: np.ndarray, images: list[np.ndarray] | None, kind: str, margin: float, alpha: float) -> dict:
    """t-test, sign-flip p and bootstrap of paired differences d (FedSQ − baseline per seed).

    kind: "parity" (TOST within ± margin, two-sided 1 − 2 alpha CI), "greater" or "less" (the
    direction in which FedSQ is better; one-sided bound at 1 − alpha).
    """
    # Accuracies and rounds are far coarser than 1e-12: rounding drops float noise that would
    # otherwise pass for a spread between seeds whose differences are equal.
    d = np.round(np.asarray(d, dtype=float), 12)
    row = {"n": len(d), "diff_mean": d.mean() if len(d) else np.nan, "diff_sd": d.std(ddof=1) if len(d) > 1 else np.nan}
    row["ci_level"] = 1 - 2 * alpha if kind == "parity" else 1 - alpha
    if len(d) < MIN_SEEDS:
        return row
    constant = np.ptp(d) == 0  # the t statistic is undefined: no spread to scale by

    def t_p(shift: float, alternative: str) -> float:
        return np.nan if constant else float(stats.ttest_1samp(d, shift, alternative=alternative).pvalue)

    def flip_p(shift: float, alternative: str) -> float:
        return sign_flip_p(d - shift, alternative)

    if kind == "parity":  # inside (−margin, +margin) against beyond either end
        tests = {"p": [(-margin, "greater"), (margin, "less")], "p_reverse": [(margin, "greater"), (-margin, "less")]}
        combine = {"p": max, "p_reverse": min}
    else:
        worse = {"greater": "less", "less": "greater"}[kind]
        tests, combine = {"p": [(0.0, kind)], "p_reverse": [(0.0, worse)]}, {"p": max, "p_reverse": max}
    for name, one_sided in tests.items():
        t_value = combine[name](t_p(*test) for test in one_sided)
        flip_value = combine[name](flip_p(*test) for test in one_sided)
        if name == "p":
            row["p_t"], row["p_signflip"] = t_value, flip_value
        row[name] = flip_value if constant else t_value
    row["p_by"] = "sign-flip" if constant else "t"

    if constant:
        low = high = d[0]
    elif kind == "parity":
        low, high = stats.ttest_1samp(d, 0.0).confidence_interval(row["ci_level"])
    else:
        low, high = stats.ttest_1samp(d, 0.0, alternative=kind).confidence_interval(row["ci_level"])
    boot = paired_bootstrap(d, images)
    quantiles = {"parity": (alpha, 1 - alpha), "greater": (alpha, np.nan), "less": (np.nan, 1 - alpha)}[kind]
    boot_low, boot_high = (np.nan if np.isnan(q) else np.quantile(boot, q) for q in quantiles)
    keep_low, keep_high = kind != "less", kind != "greater"  # a one-sided bound has one side only
    row.update(
        ci_low=float(low) if keep_low else np.nan, ci_high=float(high) if keep_high else np.nan,
        boot_low=boot_low, boot_high=boot_high, boot_over="seeds" if images is None else "seeds × test images",
    )
    return row


# --- the claims table ------------------------------------------------------------------------


def claims_table(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    *,
    parity_margin: float = 0.015,
    flat_points: float = 0.01,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per (family, claim, measure, cell, baseline); see the module docstring for the rules.

    runs: one row per run (report.load_runs): tags, summary figures, rounds_to_<target>, rounds,
    correct_val / correct_test (per-image correctness strings, or NaN in old records).
    curves: the stacked metrics.csv rows (round, val_acc, ...) with the tags.
    """
    reject_duplicates(runs)
    gains = last_quarter_gain(curves)
    rising = {arm for arm, gain in gains.items() if gain >= flat_points}
    primary_cells = {}
    rows = []
    for cell, group in runs.groupby(CELL):
        keys = dict(zip(CELL, cell))
        arm = (keys["lr_mode"], keys["bn"])
        fedsq = group[group["method"] == "fedsq"]
        if fedsq.empty:
            continue
        for baseline, other in group[group["method"] != "fedsq"].groupby("method"):
            pairs = fedsq.merge(other, on="seed", suffixes=("_fedsq", "_baseline"))
            arms = [(*cell[:3], method, *cell[3:]) for method in ("fedsq", baseline)]
            base = {**keys, "baseline": baseline, **_convergence(arms, rising)}
            outcomes = [PRIMARY, SECONDARY] if arm == PRIMARY_ARM else [PRIMARY]
            for outcome in outcomes:
                family = "controls" if arm != PRIMARY_ARM else "primary" if outcome == PRIMARY else "secondary"
                rows += _accuracy_rows(pairs, outcome, {**base, "family": family}, parity_margin, alpha)
            if arm == PRIMARY_ARM:
                primary_cells[(*cell[:3], baseline)] = pairs
            family = "speed" if arm == PRIMARY_ARM else "speed controls"
            rows += _speed_rows(pairs, {**base, "family": family}, parity_margin, alpha, arms, gains, flat_points)
    for (*cell, lr_mode, bn), group in runs.groupby(CELL):
        if (lr_mode, bn) != PRIMARY_ARM:
            rows += _did_rows(group, primary_cells, dict(zip(CELL, (*cell, lr_mode, bn))), rising, alpha)
    claims = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    return _verdicts(claims, alpha)


def _convergence(arms: list[tuple], rising: set) -> dict:
    """Which of these arms still rose, named, and so whether the verdicts on them are budget-bound."""
    named = [arm_name(arm) for arm in arms if arm in rising]
    return {"rising": "; ".join(named), "budget_bound": bool(named)}


def arm_name(arm: tuple) -> str:
    """An arm (GROUP values) as the tables name a still-rising one: split, method and ``arm_label``."""
    keys = dict(zip(GROUP, arm))
    return f"{keys['split']} {keys['method']} ({arm_label(keys['lr_mode'], keys['bn'])})"


def _image_differences(pairs: pd.DataFrame, outcome: str) -> list[np.ndarray] | None:
    """Per seed, FedSQ's minus the baseline's correctness (−1, 0, 1) on each evaluated image; None
    where a record lacks correct_at_best (old records) or the two arms saw different images."""
    column = IMAGES[outcome]
    differences = []
    for fedsq, baseline in zip(pairs.get(f"{column}_fedsq", []), pairs.get(f"{column}_baseline", [])):
        if not (isinstance(fedsq, str) and isinstance(baseline, str)) or len(fedsq) != len(baseline) or not fedsq:
            return None
        differences.append(_correct(fedsq) - _correct(baseline))
    return differences if len(differences) == len(pairs) and len(pairs) else None


def _correct(flags: str) -> np.ndarray:
    return np.frombuffer(flags.encode(), dtype=np.uint8).astype(np.int8) - ord("0")


def _accuracy_rows(pairs: pd.DataFrame, outcome: str, base: dict, margin: float, alpha: float) -> list[dict]:
    """iid parity against FedAvg, Dirichlet superiority against every baseline, on one outcome."""
    split, baseline = base["split"], base["baseline"]
    if split == "iid" and baseline == "fedavg":
        claim, kind = "iid_parity", "parity"
    elif split.startswith("dir"):
        claim, kind = "dirichlet_robust", "greater"
    else:
        return []
    pairs = pairs.dropna(subset=[f"{outcome}_fedsq", f"{outcome}_baseline"])
    fedsq, other = pairs[f"{outcome}_fedsq"], pairs[f"{outcome}_baseline"]
    row = {**base, "claim": claim, "measure": outcome, "fedsq_mean": fedsq.mean(), "baseline_mean": other.mean()}
    row.update(_paired_test(fedsq - other, _image_differences(pairs, outcome), kind, margin, alpha))
    if kind == "parity" and row["n"] >= 2 and row["diff_sd"] > 0:
        row["power"] = parity_power(row["diff_sd"], row["n"], margin, alpha)
        row["smallest_margin"] = smallest_margin(row["diff_sd"], row["n"], alpha)
    return [row]


def _noninferior(pairs: pd.DataFrame, margin: float, alpha: float) -> bool | float:
    """Whether FedSQ's primary outcome is non-inferior: one-sided (1 − alpha) lower bound of
    FedSQ − baseline above −margin. NaN with too few seeds to tell."""
    d = (pairs[f"{PRIMARY}_fedsq"] - pairs[f"{PRIMARY}_baseline"]).dropna()
    if len(d) < MIN_SEEDS:
        return np.nan
    return bool(_paired_test(d, None, "greater", margin, alpha)["ci_low"] > -margin)


def _speed_rows(
    pairs: pd.DataFrame, base: dict, margin: float, alpha: float, arms: list[tuple], gains: pd.Series,
    flat_points: float,
) -> list[dict]:
    """Rounds to each fixed target (censored at budget + 1) and round of best where both arms flattened."""
    base = {**base, "claim": "fewer_rounds", "noninferior": _noninferior(pairs, margin, alpha)}
    rows = []
    targets = [c.removesuffix("_fedsq") for c in pairs if c.startswith("rounds_to_") and c.endswith("_fedsq")]
    for target in sorted(targets, key=lambda c: float(c.removeprefix("rounds_to_"))):
        fedsq, other = pairs[f"{target}_fedsq"], pairs[f"{target}_baseline"]
        censored_fedsq, censored_other = fedsq.isna(), other.isna()
        fedsq = fedsq.fillna(pairs["rounds_fedsq"] + 1)  # never reached: censored at the budget
        other = other.fillna(pairs["rounds_baseline"] + 1)
        row = {**base, "measure": target, "fedsq_mean": fedsq.mean(), "baseline_mean": other.mean(),
               "fedsq_censored": int(censored_fedsq.sum()), "baseline_censored": int(censored_other.sum())}
        if (censored_fedsq & censored_other).all():
            row.update(n=len(pairs), verdict=NOT_REACHED)
        else:
            row.update(_paired_test((fedsq - other).dropna(), None, "less", margin, alpha))  # NaN: no budget recorded
        rows.append(row)
    if "best_round_fedsq" in pairs:
        fedsq, other = pairs["best_round_fedsq"], pairs["best_round_baseline"]
        row = {**base, "measure": "best_round", "fedsq_mean": fedsq.mean(), "baseline_mean": other.mean()}
        if all(gains.get(arm, np.inf) < flat_points for arm in arms):  # no curves: not known to be flat
            row.update(_paired_test((fedsq - other).dropna(), None, "less", margin, alpha))
        else:
            row.update(n=len(pairs), verdict=NOT_FLAT)
        rows.append(row)
    return rows


def _did_rows(group: pd.DataFrame, primary_cells: dict, keys: dict, rising: set, alpha: float) -> list[dict]:
    """Per baseline: per seed (gain under the control) − (gain in the primary arm), one-sided < 0."""
    rows = []
    fedsq = group[group["method"] == "fedsq"]
    for baseline, other in group[group["method"] != "fedsq"].groupby("method"):
        primary = primary_cells.get((keys["dataset"], keys["backbone"], keys["split"], baseline))
        if fedsq.empty or primary is None:
            continue
        control = fedsq.merge(other, on="seed", suffixes=("_fedsq", "_baseline"))
        outcome = [f"{PRIMARY}_fedsq", f"{PRIMARY}_baseline"]
        seeds = sorted(set(control.dropna(subset=outcome)["seed"]) & set(primary.dropna(subset=outcome)["seed"]))
        control, primary = (pairs.set_index("seed").loc[seeds] for pairs in (control, primary))
        gain_control = control[outcome[0]] - control[outcome[1]]
        gain_primary = primary[outcome[0]] - primary[outcome[1]]
        images_control, images_primary = _image_differences(control, PRIMARY), _image_differences(primary, PRIMARY)
        images = None  # the same test images in both arms: per image, (control gain) − (primary gain)
        if images_control is not None and images_primary is not None:
            if all(len(c) == len(p) for c, p in zip(images_control, images_primary)):
                images = [c - p for c, p in zip(images_control, images_primary)]
        arms = [(keys["dataset"], keys["backbone"], keys["split"], method, lr_mode, bn)
                for method in ("fedsq", baseline) for lr_mode, bn in [(keys["lr_mode"], keys["bn"]), PRIMARY_ARM]]
        row = {**keys, "family": "control DiD", "claim": "control_gain_shrinks", "measure": PRIMARY,
               "baseline": baseline, "fedsq_mean": gain_control.mean(), "baseline_mean": gain_primary.mean(),
               **_convergence(arms, rising)}
        row.update(_paired_test(gain_control - gain_primary, images, "less", 0.0, alpha))
        rows.append(row)
    return rows


def _verdicts(claims: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Holm within each family (parity rows excepted: TOST at alpha), then each row's verdict."""
    parity = claims["claim"] == "iid_parity"
    for family in claims["family"].unique():
        tested = claims.index[(claims["family"] == family) & ~parity & claims["p"].notna()]
        claims.loc[tested, "p_holm"] = holm(claims.loc[tested, "p"].to_numpy(float))
        claims.loc[tested, "p_reverse_holm"] = holm(claims.loc[tested, "p_reverse"].to_numpy(float))
    p = np.where(parity, claims["p"], claims["p_holm"]).astype(float)
    p_reverse = np.where(parity, claims["p_reverse"], claims["p_reverse_holm"]).astype(float)
    # "Fewer rounds" needs FedSQ non-inferior in accuracy; NaN (too few seeds) does not show it.
    speed_worse = (claims["claim"] == "fewer_rounds") & ~claims["noninferior"].eq(True)
    verdict = np.select(
        [claims["n"] < MIN_SEEDS, claims["verdict"].notna(), (p < alpha) & speed_worse, p < alpha, p_reverse < alpha],
        [TOO_FEW, claims["verdict"], NOT_NONINFERIOR, SUPPORTED, CONTRADICTED],
        default=INCONCLUSIVE,
    )
    claims["verdict"] = verdict
    claims["budget_bound"] = claims["budget_bound"].astype(bool)
    return claims


# --- what the table says ---------------------------------------------------------------------


def declared_analysis(parity_margin: float, flat_points: float, alpha: float) -> str:
    """How to read the claims tables: the rules above, in words, with the configured numbers."""
    margin = f"±{100 * parity_margin:g} points"
    return "\n".join([
        f"- **Outcomes.** Primary: {OUTCOMES[PRIMARY]} (`{PRIMARY}`). Secondary: {OUTCOMES[SECONDARY]}"
        f" (`{SECONDARY}`), in rows and a Holm family of its own.",
        "- **Pairing.** The methods of one seed share partition and client sampling: every test is on the"
        " per-seed differences FedSQ − baseline (n = seeds both ran; accuracies in percentage points)."
        " Two runs of one arm and seed are an error, never averaged.",
        "- **Families**, each Holm-adjusted on its own: *primary* (each method at its tuned lr, pooled"
        " BatchNorm, primary outcome), *secondary* (same arm, secondary outcome), *controls* (the equal-lr"
        " and BatchNorm controls, primary outcome), *control DiD* (does the FedSQ − baseline gain shrink"
        " under a control? per seed, gain under the control − gain in the primary arm, one-sided < 0),"
        " *speed* and *speed controls* (rounds).",
        f"- **Tests.** Superiority: one-sided paired t-test, beside it the one-sided {1 - alpha:.0%} bound."
        f" Parity (i.i.d., FedSQ vs FedAvg): TOST within {margin}, with the two-sided {1 - 2 * alpha:.0%} CI"
        " and the test's power at a true difference of 0 from the measured paired sd (not Holm-adjusted)."
        " Beside each t-test: an exact sign-flip p (all 2^n sign patterns) and a paired bootstrap"
        f" bound ({BOOTSTRAP_RESAMPLES} seeded resamples of seeds and, within each, of the test images both"
        " arms saw; seeds only where a record lacks per-image results, as the table says).",
        f"- **Which p decides.** The t-test p after Holm, against α = {alpha:g}. Where the difference is the"
        " same in every seed the t-test is undefined (shown –) and the sign-flip p decides (never below 1/2^n).",
        "- **Speed.** Rounds to each fixed target accuracy (`eval.targets`); a run that never reaches a target is"
        " censored at the budget (counted as budget + 1, the counts shown), a target no run of either arm"
        " reached is *not reached*. Round of best only where both arms flattened, else *not tested (not flat)*."
        f" Fewer rounds is supported only where FedSQ is non-inferior on the primary outcome (one-sided"
        f" {1 - alpha:.0%} lower bound of the difference above −{100 * parity_margin:g} points).",
        f"- **Convergence.** Last-quarter gain: mean over seeds of (mean val acc over the last quarter of rounds −"
        f" over the quarter before). An arm that still rose by {100 * flat_points:g} point(s) or more is named,"
        " and the verdicts that involve it are budget-bound: they hold at this budget, not at convergence.",
        f"- **Verdicts.** supported: the claim's test significant; contradicted: the opposite test significant"
        f" (FedSQ worse; parity: the CI entirely outside {margin}); inconclusive: neither; too few seeds: fewer"
        f" than {MIN_SEEDS} paired seeds.",
    ])


def claims_display(claims: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Claims as readable strings: accuracies in percentage points, rounds as rounds."""
    rounds = claims["measure"].str.startswith("rounds_to_") | (claims["measure"] == "best_round")
    scale = np.where(rounds, 1.0, 100.0)
    shown = pd.DataFrame({
        "family": claims["family"], "claim": claims["claim"].map(CLAIMS),
        "measure": claims["measure"].map(_measure_name),
    })
    for key in ["dataset", "backbone", "split", "baseline"]:
        shown[key] = claims[key]
    shown["arm"] = [arm_label(lr, bn) for lr, bn in zip(claims["lr_mode"], claims["bn"])]
    shown["n"] = claims["n"]
    censored = claims[["fedsq_censored", "baseline_censored"]].fillna(0).to_numpy(int)
    for side, header, k in [("fedsq_mean", "FedSQ mean", 0), ("baseline_mean", "baseline mean", 1)]:
        shown[header] = [
            _number(v * s) + (f" ({c} censored)" if c else "") for v, s, c in zip(claims[side], scale, censored[:, k])
        ]
    shown["difference"] = [_number(v * k, "+.1f") for v, k in zip(claims["diff_mean"], scale)]
    shown["t bound / CI"] = [
        _interval(level, lo * k, hi * k)
        for level, lo, hi, k in zip(claims["ci_level"], claims["ci_low"], claims["ci_high"], scale)
    ]
    shown["bootstrap"] = [
        "–" if pd.isna(over) else f"{_interval(level, lo * k, hi * k)} ({over})"
        for level, lo, hi, k, over in zip(
            claims["ci_level"], claims["boot_low"], claims["boot_high"], scale, claims["boot_over"]
        )
    ]
    shown["p (t)"] = claims["p_t"].map(_p_value)
    shown["p (sign-flip)"] = claims["p_signflip"].map(_p_value)
    shown["p Holm"] = claims["p_holm"].map(_p_value)
    shown["FedSQ non-inferior"] = claims["noninferior"].map({True: "yes", False: "no"}).fillna("–")
    shown["power"] = claims["power"].map(lambda v: "–" if pd.isna(v) else f"{v:.0%}")
    untested = {TOO_FEW, NOT_REACHED, NOT_FLAT}  # no verdict to bind to the budget
    shown["verdict"] = [
        v + (" (budget-bound)" if bound and v not in untested else "")
        for v, bound in zip(claims["verdict"], claims["budget_bound"])
    ]
    return shown if columns is None else shown[columns]


def _measure_name(measure: str) -> str:
    if measure in OUTCOMES:
        return f"{OUTCOMES[measure]} (%)"
    if measure == "best_round":
        return "round of best"
    return f"rounds to {float(measure.removeprefix('rounds_to_')):.0%}"


def arm_label(lr_mode: str, bn: str) -> str:
    """The arm in words: the primary arm, a named control, or its lr mode and BatchNorm handling."""
    if (lr_mode, bn) == PRIMARY_ARM:
        return "tuned lr, pooled BN"
    return CONTROLS.get((lr_mode, bn), f"{lr_mode} lr, bn {bn}")


def _interval(level: float, low: float, high: float) -> str:
    if pd.isna(low) and pd.isna(high):
        return "–"
    if pd.isna(high):
        return f"{level:.0%} lower bound {low:+.1f}"
    if pd.isna(low):
        return f"{level:.0%} upper bound {high:+.1f}"
    return f"{level:.0%} [{low:+.1f}, {high:+.1f}]"


def _number(value: float, spec: str = ".1f") -> str:
    return "–" if pd.isna(value) else format(value, spec)


def _p_value(p: float) -> str:
    return "–" if pd.isna(p) else "<0.001" if p < 0.001 else f"{p:.3f}"

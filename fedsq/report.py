"""Tables, claim verdicts and plots from finished FL runs.

Reads each run folder's ``summary.json`` and ``metrics.csv`` (the engine's contract),
groups runs by (dataset, backbone, split, method, lr_mode) and summarises over seeds as
mean ± sample std with the number of seeds beside it. One seed cannot rank methods
(round-to-round noise reached 0.46 accuracy in single runs), so every verdict in the
claims table needs at least two seeds and a gap wider than the seeds' spread.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

GROUP = ["dataset", "backbone", "split", "method", "lr_mode"]
# summary.json key -> table header; accuracies are shown in percent in Markdown and LaTeX.
SUMMARY_METRICS = {
    "best_val_acc": "best val acc (%)",
    "best_round": "best round",
    "test_acc_at_best": "test acc at best (%)",
    "final_val_acc": "final val acc (%)",
    "final_test_acc": "final test acc (%)",
    "last3_val_acc": "last-3 val acc (%)",
}
ACCURACIES = {"best_val_acc", "test_acc_at_best", "final_val_acc", "final_test_acc", "last3_val_acc"}
METHOD_ORDER = ["fedavg", "fedprox", "fedsq"]  # the paper's methods first, others after
LR_MODE_STYLE = {"calibrated": "-", "equal": "--"}
SUPPORTED, NOT_SUPPORTED, NOT_ENOUGH = "supported", "not supported", "not enough seeds"
CLAIM_COLUMNS = [
    "claim", "dataset", "backbone", "split", "baseline", "lr_mode", "metric",
    "fedsq_mean", "fedsq_std", "fedsq_n", "baseline_mean", "baseline_std", "baseline_n",
    "fedsq_last3_mean", "baseline_last3_mean", "verdict",
]
CLAIMS = {
    "iid_parity": "FedSQ ≈ FedAvg on i.i.d. (best val acc)",
    "dirichlet_robust": "FedSQ ≥ baseline under Dirichlet (best val acc)",
    "fewer_rounds": "FedSQ needs fewer rounds",
}


def build(run_dirs: list[Path], out: Path, partitions: list[Path] = (), parity_tolerance: float = 0.02) -> Path:
    """Write out/tables/{results,claims}.{csv,md} (+ results.tex) and out/plots/*.png; return out.

    Args:
        run_dirs: run folders, each with summary.json (required) and metrics.csv (curves).
        out: output folder.
        partitions: partition folders (class_counts.csv, heatmap.png) to collect into the plots.
        parity_tolerance: largest gap in mean best val acc that still counts as "FedSQ ≈ FedAvg".
    """
    out = Path(out)
    runs, curves = load_runs(run_dirs)
    tables, plots = out / "tables", out / "plots"
    tables.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)

    results = results_table(runs)
    results.to_csv(tables / "results.csv", index=False)
    display = results_display(results)
    (tables / "results.md").write_text(display.to_markdown(index=False) + "\n")
    styler = display.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    latex = styler.to_latex(hrules=True)
    (tables / "results.tex").write_text(latex.replace("±", r"$\pm$"))

    claims = claims_table(runs, parity_tolerance)
    claims.to_csv(tables / "claims.csv", index=False)
    (tables / "claims.md").write_text(claims_display(claims).to_markdown(index=False) + "\n")

    _save(plot_curves(curves, "val_acc", "validation accuracy"), plots / "val_acc_vs_round.png")
    _save(plot_gate_agreement(curves), plots / "gate_agreement_vs_round.png")
    _save(plot_best_acc_bars(results), plots / "best_acc_bars.png")
    collect_partitions([Path(p) for p in partitions], plots / "partitions")
    return out


# --- loading ---------------------------------------------------------------------------------


def load_runs(run_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per finished run (tags + summary numbers) and the stacked per-round metrics."""
    if not run_dirs:
        raise ValueError("report: no run folders given")
    rows, curves = [], []
    for run_dir in map(Path, run_dirs):
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            warnings.warn(f"{run_dir}: no summary.json (unfinished run?); left out of the report", stacklevel=2)
            continue
        summary = json.loads(summary_path.read_text())
        row = _run_keys(summary, run_dir)
        row.update({key: summary.get(key) for key in SUMMARY_METRICS})
        for target, rounds in (summary.get("rounds_to_target") or {}).items():
            row[f"rounds_to_{float(target):g}"] = rounds
        rows.append(row)
        metrics_path = run_dir / "metrics.csv"
        if metrics_path.is_file():
            curves.append(pd.read_csv(metrics_path).assign(**{k: row[k] for k in [*GROUP, "seed"]}))
    if not rows:
        raise FileNotFoundError(f"report: none of the {len(run_dirs)} run folders has a summary.json")
    runs = pd.DataFrame(rows)
    metric_columns = [c for c in runs.columns if c not in [*GROUP, "seed", "run_dir"]]
    runs[metric_columns] = runs[metric_columns].apply(pd.to_numeric, errors="coerce")
    return runs, pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()


def _run_keys(summary: dict, run_dir: Path) -> dict:
    """Grouping keys from the summary's tags, falling back on the resolved config."""
    tags, config = summary.get("tags") or {}, summary.get("config") or {}
    method = config.get("method")
    fallback = {
        "dataset": config.get("dataset"),
        "backbone": config.get("backbone"),
        "method": method.get("name") if isinstance(method, dict) else method,
        "seed": config.get("seed"),
        "lr_mode": "calibrated",
    }
    keys = {key: tags[key] if tags.get(key) is not None else fallback.get(key) for key in [*GROUP, "seed"]}
    missing = [key for key, value in keys.items() if value is None]
    if missing:
        warnings.warn(f"{run_dir}: summary.json lacks {', '.join(missing)}; shown as 'n/a'", stacklevel=3)
    return {key: "n/a" if value is None else str(value) for key, value in keys.items()} | {"run_dir": str(run_dir)}


def _sort(frame: pd.DataFrame, by: list[str] = (*GROUP, "seed")) -> pd.DataFrame:
    """Reading order: claims as listed; fedavg, fedprox, fedsq, then other methods;
    iid, then Dirichlet by decreasing alpha; calibrated lr before the equal-lr control."""

    def key(column: pd.Series) -> pd.Series:
        if column.name == "claim":
            return column.map(list(CLAIMS).index)
        if column.name in ("method", "baseline"):
            return column.map(_method_order)
        if column.name == "split":
            return column.map(_split_order)
        if column.name == "lr_mode":
            return column.map(lambda mode: (mode != "calibrated", mode))
        return column

    by = [c for c in by if c in frame.columns]
    return frame.sort_values(by, key=key, kind="stable").reset_index(drop=True)


def _method_order(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _split_order(split: str) -> tuple:
    if split == "iid":
        return (0, 0.0, split)
    if split.startswith("dir"):
        try:
            return (1, -float(split[3:]), split)
        except ValueError:
            pass
    return (2, 0.0, split)


# --- results table ---------------------------------------------------------------------------


def results_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Numeric summary per group: n_seeds, <metric>_mean, <metric>_std (sample std; NaN for one seed).

    rounds_to_<t>: mean and std over the seeds that reached t; <..>_reached counts them
    (a seed that never reached t has no round to average).
    """
    metrics = [c for c in runs.columns if c in SUMMARY_METRICS or c.startswith("rounds_to_")]
    groups = runs.groupby(GROUP, sort=False)
    table = groups[metrics].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table.insert(0, "n_seeds", groups.size())
    for metric in metrics:
        if metric.startswith("rounds_to_"):
            table[f"{metric}_reached"] = groups[metric].count()
    return _sort(table.reset_index())


def _mean_std(mean: float, std: float, scale: float = 1.0) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):  # one seed: no spread to show
        return f"{mean * scale:.1f}"
    return f"{mean * scale:.1f} ± {std * scale:.1f}"


def results_display(results: pd.DataFrame) -> pd.DataFrame:
    """The results table as "mean ± std" strings, accuracies in percent."""
    shown = results[GROUP].copy()
    shown["seeds"] = results["n_seeds"]
    for metric, header in SUMMARY_METRICS.items():
        if f"{metric}_mean" in results:
            scale = 100.0 if metric in ACCURACIES else 1.0
            means, stds = results[f"{metric}_mean"], results[f"{metric}_std"]
            shown[header] = [_mean_std(m, s, scale) for m, s in zip(means, stds)]
    for column in results.columns:
        if column.startswith("rounds_to_") and column.endswith("_mean"):
            metric = column.removesuffix("_mean")
            target = float(metric.removeprefix("rounds_to_"))
            stats = zip(results[column], results[f"{metric}_std"], results[f"{metric}_reached"], results["n_seeds"])
            shown[f"rounds to {target:.0%} (reached)"] = [f"{_mean_std(m, s)} ({r}/{n})" for m, s, r, n in stats]
    return shown


# --- claims ----------------------------------------------------------------------------------


def claims_table(runs: pd.DataFrame, parity_tolerance: float = 0.02) -> pd.DataFrame:
    """The paper's three claims, one row per (claim, dataset, backbone, split, baseline, lr_mode).

    Verdicts compare seed intervals mean ± std (``not enough seeds`` below two seeds a side):
    - iid_parity: supported if the intervals overlap and the means differ by at most
      ``parity_tolerance``; not supported if the intervals are disjoint.
    - dirichlet_robust (FedSQ vs each baseline): supported if FedSQ's interval lies above.
    - fewer_rounds: rounds to the highest accuracy target every seed of both methods reached
      (else rounds to best); supported if FedSQ's interval lies below.
    Anything else is ``not enough seeds``: the spread is too wide to decide.
    Calibrated and equal-lr rows sit side by side, so a gap that vanishes at equal lr shows.
    """
    rows = []
    for (dataset, backbone, split, lr_mode), group in runs.groupby(["dataset", "backbone", "split", "lr_mode"]):
        fedsq = group[group["method"] == "fedsq"]
        if fedsq.empty:
            continue
        for baseline, other in group[group["method"] != "fedsq"].groupby("method"):
            keys = dict(dataset=dataset, backbone=backbone, split=split, lr_mode=lr_mode, baseline=baseline)
            if split == "iid" and baseline == "fedavg":
                rows.append(_compare("iid_parity", "best_val_acc", fedsq, other, keys, parity_tolerance))
            if split.startswith("dir"):
                rows.append(_compare("dirichlet_robust", "best_val_acc", fedsq, other, keys))
            rows.append(_compare("fewer_rounds", _rounds_metric(fedsq, other), fedsq, other, keys))
    claims = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    return _sort(claims, by=["claim", "dataset", "backbone", "split", "baseline", "lr_mode"])


def _rounds_metric(fedsq: pd.DataFrame, other: pd.DataFrame) -> str:
    both = pd.concat([fedsq, other])
    reached_by_all = [c for c in both.columns if c.startswith("rounds_to_") and both[c].notna().all()]
    return max(reached_by_all, key=lambda c: float(c.removeprefix("rounds_to_")), default="best_round")


def _compare(claim: str, metric: str, fedsq: pd.DataFrame, other: pd.DataFrame, keys: dict, tolerance=None) -> dict:
    a, b = fedsq[metric].dropna(), other[metric].dropna()
    row = {"claim": claim, **keys, "metric": metric}
    row.update(fedsq_mean=a.mean(), fedsq_std=a.std(), fedsq_n=len(a))
    row.update(baseline_mean=b.mean(), baseline_std=b.std(), baseline_n=len(b))
    row.update(fedsq_last3_mean=fedsq["last3_val_acc"].mean(), baseline_last3_mean=other["last3_val_acc"].mean())
    row["verdict"] = _verdict(claim, a, b, tolerance)
    return row


def _verdict(claim: str, fedsq: pd.Series, baseline: pd.Series, tolerance: float | None) -> str:
    if len(fedsq) < 2 or len(baseline) < 2:
        return NOT_ENOUGH
    lo_a, hi_a = fedsq.mean() - fedsq.std(), fedsq.mean() + fedsq.std()
    lo_b, hi_b = baseline.mean() - baseline.std(), baseline.mean() + baseline.std()
    if claim == "iid_parity":
        if hi_a < lo_b or hi_b < lo_a:
            return NOT_SUPPORTED
        return SUPPORTED if abs(fedsq.mean() - baseline.mean()) <= tolerance else NOT_ENOUGH
    better, worse = (lo_a > hi_b, hi_a < lo_b) if claim == "dirichlet_robust" else (hi_a < lo_b, lo_a > hi_b)
    return SUPPORTED if better else NOT_SUPPORTED if worse else NOT_ENOUGH


def claims_display(claims: pd.DataFrame) -> pd.DataFrame:
    """Claims as readable strings: accuracies in percent, rounds as rounds, n seeds beside each."""
    shown = pd.DataFrame({"claim": claims["claim"].map(CLAIMS)})
    shown[["dataset", "backbone", "split", "baseline"]] = claims[["dataset", "backbone", "split", "baseline"]]
    shown["lr"] = claims["lr_mode"]
    shown["measure"] = claims["metric"].map(_metric_label)
    for side, header in [("fedsq", "fedsq"), ("baseline", "baseline value")]:
        stats = zip(claims[f"{side}_mean"], claims[f"{side}_std"], claims[f"{side}_n"], claims["metric"])
        shown[header] = [f"{_mean_std(m, s, 100.0 if k in ACCURACIES else 1.0)} (n={n})" for m, s, n, k in stats]
    shown["last-3 val acc (%) fedsq / baseline"] = [
        f"{_mean_std(a, np.nan, 100)} / {_mean_std(b, np.nan, 100)}"
        for a, b in zip(claims["fedsq_last3_mean"], claims["baseline_last3_mean"])
    ]
    shown["verdict"] = claims["verdict"]
    return shown


def _metric_label(metric: str) -> str:
    if metric.startswith("rounds_to_"):
        return f"rounds to {float(metric.removeprefix('rounds_to_')):.0%} val acc"
    return SUMMARY_METRICS[metric].removesuffix(" (%)")


# --- plots -----------------------------------------------------------------------------------


def _method_colors(methods) -> dict:
    # The paper's methods keep their colour in every figure, whichever methods a grid has.
    others = sorted(set(methods) - set(METHOD_ORDER))
    return {m: plt.get_cmap("tab10")(i) for i, m in enumerate([*METHOD_ORDER, *others])}


def _panels(frame: pd.DataFrame, sharey: bool = True):
    """A grid of axes: one row per (dataset, backbone), one column per split."""
    rows = sorted(frame.groupby(["dataset", "backbone"]).groups)
    splits = sorted(frame["split"].unique(), key=_split_order)
    fig, axes = plt.subplots(
        len(rows), len(splits), figsize=(max(4.2 * len(splits) + 0.6, 7.0), 3.2 * len(rows) + 1.2),
        sharey=sharey, squeeze=False, layout="constrained",
    )
    for i, (dataset, backbone) in enumerate(rows):
        for j, split in enumerate(splits):
            axes[i, j].set_title(f"{dataset} · {backbone} · {split}", fontsize=10)
    return fig, axes, rows, splits


def _seed_band(ax, curves: pd.DataFrame, column: str, color, linestyle: str, label: str) -> None:
    """Mean over seeds as a line, min–max over seeds as a band."""
    stats = curves.groupby("round")[column].agg(["mean", "min", "max"]).dropna()
    if stats.empty:
        return
    ax.plot(stats.index, stats["mean"], color=color, linestyle=linestyle, label=label, linewidth=1.6)
    ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.15, linewidth=0)


def plot_curves(curves: pd.DataFrame, column: str, ylabel: str):
    """One panel per backbone × split, one line per method (dashed: equal-lr control), seed band."""
    curves = _measured(curves, column)
    if curves.empty:
        return _no_data_figure(f"no {column} in any metrics.csv")
    fig, axes, rows, splits = _panels(curves)
    colors = _method_colors(curves["method"])
    for (dataset, backbone, split, method, lr_mode), group in curves.groupby(GROUP):
        ax = axes[rows.index((dataset, backbone)), splits.index(split)]
        label = method if lr_mode == "calibrated" else f"{method} ({lr_mode} lr)"
        _seed_band(ax, group, column, colors[method], LR_MODE_STYLE.get(lr_mode, ":"), label)
    _finish(fig, axes, "round", ylabel, f"{ylabel} per round: mean over seeds, band = min–max")
    return fig


def plot_gate_agreement(curves: pd.DataFrame):
    """Gate agreement with the pretrained gates, with the model's own BN statistics and the pretrained ones.

    Shown for the calibrated runs only (the equal-lr controls would double the lines).
    """
    own, pretrained = "gate_agreement", "gate_agreement_pretrained_bn"
    curves = _measured(curves, own)
    if curves.empty:
        return _no_data_figure("no gate agreement in any metrics.csv (eval.drift_every: 0?)")
    modes = curves["lr_mode"].unique()
    curves = curves[curves["lr_mode"] == ("calibrated" if "calibrated" in modes else modes[0])]
    fig, axes, rows, splits = _panels(curves)
    colors = _method_colors(curves["method"])
    for (dataset, backbone, split, method), group in curves.groupby(["dataset", "backbone", "split", "method"]):
        ax = axes[rows.index((dataset, backbone)), splits.index(split)]
        _seed_band(ax, group, own, colors[method], "-", f"{method}, own BN stats")
        if pretrained in group:
            _seed_band(ax, group, pretrained, colors[method], "--", f"{method}, pretrained BN stats")
    title = "agreement of gates with the pretrained model (mean over seeds, band = min–max)"
    _finish(fig, axes, "round", "gate agreement", title)
    return fig


def plot_best_acc_bars(results: pd.DataFrame):
    """Best validation accuracy per split and method, error bars = std over seeds; hatched = equal lr."""
    fig, axes = plt.subplots(
        1, results.groupby(["dataset", "backbone"]).ngroups,
        figsize=(max(0.5 * len(results) + 3.0, 7.0), 4.4), squeeze=False, sharey=True, layout="constrained",
    )
    colors = _method_colors(results["method"])
    for ax, ((dataset, backbone), panel) in zip(axes[0], results.groupby(["dataset", "backbone"])):
        splits = sorted(panel["split"].unique(), key=_split_order)
        bars = panel[["method", "lr_mode"]].drop_duplicates().pipe(_sort)
        width = 0.8 / len(bars)
        for k, (method, lr_mode) in enumerate(bars.itertuples(index=False)):
            rows = panel[(panel["method"] == method) & (panel["lr_mode"] == lr_mode)].set_index("split").reindex(splits)
            label = method if lr_mode == "calibrated" else f"{method} ({lr_mode} lr)"
            ax.bar(
                np.arange(len(splits)) + (k - (len(bars) - 1) / 2) * width, rows["best_val_acc_mean"], width,
                yerr=rows["best_val_acc_std"], capsize=3, color=colors[method],
                hatch="//" if lr_mode != "calibrated" else None, edgecolor="white", label=label,
            )
        ax.set_xticks(range(len(splits)), splits)
        ax.set_title(f"{dataset} · {backbone}", fontsize=10)
    axes[0, 0].set_ylabel("best validation accuracy")
    axes[0, 0].set_ylim(0, 1)
    _legend(fig, axes)
    fig.suptitle("best validation accuracy: mean ± std over seeds", fontsize=11)
    return fig


def _finish(fig, axes, xlabel: str, ylabel: str, title: str) -> None:
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    _legend(fig, axes)
    fig.suptitle(title, fontsize=11)


def _legend(fig, axes) -> None:
    """One legend under the panels, with every entry any panel drew."""
    entries = {}
    for ax in axes.flat:
        entries.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=min(len(entries), 3), fontsize=9)


def _measured(curves: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows where ``column`` was measured (it may be evaluated every k rounds only, or never)."""
    return curves.dropna(subset=[column]) if column in curves else curves.iloc[0:0]


def _no_data_figure(message: str):
    """A picture that says what is missing: the pipeline declares every plot as an output."""
    warnings.warn(f"{message}: plot left empty", stacklevel=3)
    fig = plt.figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, message, ha="center", va="center")
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect_partitions(partition_dirs: list[Path], out: Path) -> None:
    """Copy each partition's heatmap.png as <dataset>_<split>_<seed>.png and draw an overview.

    The overview shows every partition's class shares per client side by side, so iid and
    Dirichlet splits can be compared at a glance.
    """
    if not partition_dirs:
        return
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    # iid first, then Dirichlet by decreasing alpha, as in the tables.
    for folder in sorted(partition_dirs, key=lambda f: (f.parts[-3], _split_order(f.parts[-2]), f.parts[-1])):
        # results/partitions/<dataset>/<split>/seed<seed>/ -> digits_dir0.1_seed0
        name = "_".join(folder.parts[-3:])
        if (folder / "heatmap.png").is_file():
            shutil.copyfile(folder / "heatmap.png", out / f"{name}.png")
        if (folder / "class_counts.csv").is_file():
            counts[name] = pd.read_csv(folder / "class_counts.csv", index_col=0)
        else:
            warnings.warn(f"{folder}: no class_counts.csv", stacklevel=2)
    if not counts:
        return
    fig, axes = plt.subplots(
        1, len(counts), figsize=(3.6 * len(counts) + 1.2, 3.6), squeeze=False, layout="constrained"
    )
    for ax, (name, table) in zip(axes[0], counts.items()):
        shares = table.div(table.sum(axis=1), axis=0)
        image = ax.imshow(shares.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("class")
        if len(table) <= 20:
            ax.set_yticks(range(len(table)))
    axes[0, 0].set_ylabel("client")
    fig.colorbar(image, ax=axes[0, -1], label="share of the client's samples")
    fig.suptitle("class shares per client", fontsize=11)
    _save(fig, out.parent / "partitions.png")

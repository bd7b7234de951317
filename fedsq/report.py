"""Tables and plots from finished FL runs; the claims through ``fedsq.analysis``.

Reads each run folder's ``summary.json`` and ``metrics.csv`` (the engine's contract) and
groups runs by (dataset, backbone, split, method, lr_mode, bn): the results table summarises
each group over seeds as mean ± sample std with the number of seeds beside it. Every rule that
turns runs into verdicts lives in ``fedsq/analysis.py``.
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

from fedsq import analysis  # noqa: E402

GROUP = analysis.GROUP
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
DEFAULT_BN = analysis.PRIMARY_ARM[1]  # the run config's default BatchNorm handling; other modes are marked
CLAIMS = analysis.CLAIMS
# summary.json's correct_at_best {"val": "0110...", "test": ...} -> runs table columns
CORRECT_AT_BEST = {"val": "correct_val", "test": "correct_test"}


def build(
    run_dirs: list[Path],
    out: Path,
    partitions: list[Path] = (),
    *,
    parity_margin: float = 0.015,
    flat_points: float = 0.01,
    alpha: float = 0.05,
) -> Path:
    """Write out/tables/{results,claims}.{csv,md} (+ results.tex) and out/plots/*.png; return out.

    Args:
        run_dirs: run folders, each with summary.json (required) and metrics.csv (curves).
        out: output folder.
        partitions: partition folders (class_counts.csv, heatmap.png) to collect into the plots.
        parity_margin: iid_parity holds when the paired difference in the primary outcome lies
            within ± this margin (accuracy as a fraction: 0.015 = 1.5 points); also the
            non-inferiority margin that "fewer rounds" needs.
        flat_points: an arm whose val acc rose by this much or more over the last quarter of
            rounds (a fraction: 0.01 = 1 point) has not flattened: its verdicts are budget-bound.
        alpha: significance level of every test (after the Holm adjustment).
    See ``fedsq.analysis`` for the rules.
    """
    for name, value, ok, allowed in [
        ("parity_margin", parity_margin, 0 < parity_margin <= 1, "(0, 1]"),
        ("flat_points", flat_points, 0 < flat_points <= 1, "(0, 1]"),
        ("alpha", alpha, 0 < alpha < 0.5, "(0, 0.5)"),
    ]:
        if not ok:
            raise ValueError(f"report: {name} must lie in {allowed}, got {value}")
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

    claims = analysis.claims_table(runs, curves, parity_margin=parity_margin, flat_points=flat_points, alpha=alpha)
    claims = sort_rows(claims, ["family", "claim", "dataset", "backbone", "split", "baseline", "lr_mode", "bn"])
    claims.to_csv(tables / "claims.csv", index=False)
    (tables / "claims.md").write_text(
        analysis.declared_analysis(parity_margin, flat_points, alpha) + "\n\n"
        + analysis.claims_display(claims).to_markdown(index=False, disable_numparse=True) + "\n"  # keep "+0.3" as written
    )

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
        row["rounds"] = summary.get("rounds")
        for target, rounds in (summary.get("rounds_to_target") or {}).items():
            row[f"rounds_to_{float(target):g}"] = rounds
        for split, column in CORRECT_AT_BEST.items():  # absent in records older than the field
            row[column] = (summary.get("correct_at_best") or {}).get(split)
        rows.append(row)
        metrics_path = run_dir / "metrics.csv"
        if metrics_path.is_file():
            curves.append(pd.read_csv(metrics_path).assign(**{k: row[k] for k in [*GROUP, "seed"]}))
    if not rows:
        raise FileNotFoundError(f"report: none of the {len(run_dirs)} run folders has a summary.json")
    runs = pd.DataFrame(rows)
    analysis.reject_duplicates(runs)
    metric_columns = [c for c in runs.columns if c not in [*GROUP, "seed", "run_dir", *CORRECT_AT_BEST.values()]]
    runs[metric_columns] = runs[metric_columns].apply(pd.to_numeric, errors="coerce")
    return runs, pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()


def _run_keys(summary: dict, run_dir: Path) -> dict:
    """Grouping keys: the summary's tags, where the engine writes every one of them."""
    return {key: str(summary["tags"][key]) for key in [*GROUP, "seed"]} | {"run_dir": str(run_dir)}


def sort_rows(frame: pd.DataFrame, by: list[str] = (*GROUP, "seed")) -> pd.DataFrame:
    """Reading order: families and claims as listed in fedsq.analysis; fedavg, fedprox, fedsq, then other methods;
    iid, then Dirichlet by decreasing alpha; calibrated lr before the equal-lr control;
    the default BatchNorm handling before the others."""

    def key(column: pd.Series) -> pd.Series:
        if column.name == "family":
            return column.map(analysis.FAMILIES.index)
        if column.name == "claim":
            return column.map(list(CLAIMS).index)
        if column.name in ("method", "baseline"):
            return column.map(_method_order)
        if column.name == "split":
            return column.map(_split_order)
        if column.name == "lr_mode":
            return column.map(lambda mode: (mode != "calibrated", mode))
        if column.name == "bn":
            return column.map(lambda bn: (bn != DEFAULT_BN, bn))
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
    return sort_rows(table.reset_index())


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


def _arm_label(method: str, lr_mode: str, bn: str) -> str:
    """fedsq, fedsq (equal lr), fedsq (bn frozen), fedsq (equal lr, bn frozen)."""
    notes = ([] if lr_mode == "calibrated" else [f"{lr_mode} lr"]) + ([] if bn == DEFAULT_BN else [f"bn {bn}"])
    return f"{method} ({', '.join(notes)})" if notes else method


def _arm_linestyle(lr_mode: str, bn: str) -> str:
    """Solid: calibrated lr; dashed: equal lr; dotted and dash-dotted: the same with non-default BatchNorm."""
    if bn == DEFAULT_BN:
        return "-" if lr_mode == "calibrated" else "--"
    return ":" if lr_mode == "calibrated" else "-."


def plot_curves(curves: pd.DataFrame, column: str, ylabel: str):
    """One panel per backbone × split, one line per method and arm (see _arm_linestyle), seed band."""
    curves = _measured(curves, column)
    if curves.empty:
        return _no_data_figure(f"no {column} in any metrics.csv")
    fig, axes, rows, splits = _panels(curves)
    colors = _method_colors(curves["method"])
    for (dataset, backbone, split, method, lr_mode, bn), group in sort_rows(curves).groupby(GROUP, sort=False):
        ax = axes[rows.index((dataset, backbone)), splits.index(split)]
        _seed_band(ax, group, column, colors[method], _arm_linestyle(lr_mode, bn), _arm_label(method, lr_mode, bn))
    _finish(fig, axes, "round", ylabel, f"{ylabel} per round: mean over seeds, band = min–max")
    return fig


def plot_gate_agreement(curves: pd.DataFrame):
    """Gate agreement with the pretrained gates, with the model's own BN statistics and the pretrained ones.

    Shown for the calibrated runs with the default BatchNorm handling only, where a grid has
    them (the controls would double the lines).
    """
    own, pretrained = "gate_agreement", "gate_agreement_pretrained_bn"
    curves = _measured(curves, own)
    if curves.empty:
        return _no_data_figure("no gate agreement in any metrics.csv (eval.drift_every: 0?)")
    for key, main in [("lr_mode", "calibrated"), ("bn", DEFAULT_BN)]:
        modes = curves[key].unique()
        curves = curves[curves[key] == (main if main in modes else modes[0])]
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
    """Best validation accuracy per split and method, error bars = std over seeds.

    Hatched: equal lr (//) and non-default BatchNorm (..).
    """
    fig, axes = plt.subplots(
        1, results.groupby(["dataset", "backbone"]).ngroups,
        figsize=(max(0.5 * len(results) + 3.0, 7.0), 4.4), squeeze=False, sharey=True, layout="constrained",
    )
    colors = _method_colors(results["method"])
    for ax, ((dataset, backbone), panel) in zip(axes[0], results.groupby(["dataset", "backbone"])):
        splits = sorted(panel["split"].unique(), key=_split_order)
        arms = ["method", "lr_mode", "bn"]
        bars = panel[arms].drop_duplicates().pipe(sort_rows)
        width = 0.8 / len(bars)
        for k, (method, lr_mode, bn) in enumerate(bars.itertuples(index=False)):
            arm = (panel[arms] == [method, lr_mode, bn]).all(axis=1)
            rows = panel[arm].set_index("split").reindex(splits)
            hatch = ("//" if lr_mode != "calibrated" else "") + (".." if bn != DEFAULT_BN else "")
            ax.bar(
                np.arange(len(splits)) + (k - (len(bars) - 1) / 2) * width, rows["best_val_acc_mean"], width,
                yerr=rows["best_val_acc_std"], capsize=3, color=colors[method],
                hatch=hatch or None, edgecolor="white", label=_arm_label(method, lr_mode, bn),
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

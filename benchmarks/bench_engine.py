"""What the engine costs over a hand-written loop, and whether memory grows with clients.

(a) time: ``engine.run`` (checkpoints, metrics.csv, MLflow, summary) against a plain loop
    that does the same work by hand - the same local SGD on the same batches, sample-weighted
    averaging, validation and test accuracy of the initial model and after every round,
    per-client accuracy at the end - with nothing else (resnet18 from scratch, digits,
    10 clients, 4 rounds, FedAvg with plainly averaged BatchNorm buffers, no gate-drift
    probe). Two figures: the per-round ratio, engine / plain loop of median round times from
    round 2 (target <= 1.05), and the fixed start, the seconds by which the engine ends later
    than its per-round cost explains (MLflow's imports and store set-up, once per run; not
    counted in the ratio).
(b) memory: peak resident memory of ``engine.run`` with 1000 clients against 10 clients over
    the same data (digits' training set tiled 3x so that no client has a single sample),
    FedAvg, one round. Target: ratio <= 1.1.

Every measurement runs in a fresh subprocess (its own ``ru_maxrss``, its own threads).
Shared machines drift by tens of percent within minutes, so (a) runs the two forms back to
back, swapping which goes first on each repeat, and reports medians of the per-pair figures.

    PYTHONPATH=$PWD python benchmarks/bench_engine.py [--repeats 3] [--rounds 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def base_config(root: Path, **extra) -> dict:
    from fedsq import config

    return config.load({
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "iid", "num_clients": 10}, "rounds": 4, "bn": "averaged",
        "optimizer": {"lr": 0.05}, "device": "cpu", "eval": {"drift_every": 0},
        "paths": {"data": str(root / "data"), "partition": str(root / "partition")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    } | extra)


def plain_loop(cfg: dict, start: float) -> dict:
    """FedAvg written out by hand: the reference the engine's overhead is measured against.
    ``round_seconds``: seconds from ``start`` to the end of each round's evaluation (as the
    engine's metrics.csv ``wall_seconds``)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fedsq import data, models, partition

    torch.manual_seed(cfg["seed"])
    dataset = data.load(cfg["dataset"], Path(cfg["paths"]["data"]))
    parts = partition.load(Path(cfg["paths"]["partition"]))
    splits = {s: (torch.from_numpy(np.array(getattr(dataset, s).x)), torch.from_numpy(np.array(getattr(dataset, s).y)))
              for s in ("train", "val", "test")}
    spec = models.backbone(cfg["backbone"])
    model = models.build(cfg["backbone"], dataset.num_classes, None)
    opt_cfg = cfg["optimizer"]

    def inputs(x):
        return data.to_model_input(x, cfg["image_size"], spec.mean, spec.std)

    @torch.inference_mode()
    def correct(split):
        model.eval()
        x, y = splits[split]
        return torch.cat([model(inputs(x[i:i + 256])).argmax(1) == y[i:i + 256] for i in range(0, len(y), 256)])

    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    # Round 0 is the initial model, as in the engine's metrics.csv.
    accuracies = [(correct("val").float().mean().item(), correct("test").float().mean().item())]
    round_seconds = [time.perf_counter() - start]
    for r in range(1, cfg["rounds"] + 1):
        sums, total = {}, 0
        for c, idx in enumerate(parts):
            model.load_state_dict(global_state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=opt_cfg["lr"], momentum=opt_cfg["momentum"],
                                  weight_decay=opt_cfg["weight_decay"])
            order = np.random.default_rng((cfg["seed"], r, c)).permutation(idx)
            for batch in np.array_split(order, math.ceil(len(idx) / cfg["batch_size"])):
                b = torch.from_numpy(batch)
                loss = F.cross_entropy(model(inputs(splits["train"][0][b])), splits["train"][1][b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            for k, v in model.state_dict().items():
                contribution = v.detach() * len(idx) if v.is_floating_point() else v.detach()
                sums[k] = contribution.clone() if k not in sums else sums[k] + contribution
            total += len(idx)
        global_state = {k: v / total if v.is_floating_point() else v for k, v in sums.items()}
        model.load_state_dict(global_state)
        accuracies.append((correct("val").float().mean().item(), correct("test").float().mean().item()))
        round_seconds.append(time.perf_counter() - start)
    train_correct = correct("train").numpy()
    client_acc = [train_correct[idx].mean() for idx in parts]
    return {"val_acc": accuracies[-1][0], "client_acc_mean": float(np.mean(client_acc)), "round_seconds": round_seconds}


def child(form: str, cfg_path: str, out: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import pandas as pd
    import torch

    from fedsq import engine

    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(int(cfg.pop("_threads")))

    def cpu_seconds():  # children: git, asked for the code version
        usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(u.ru_utime + u.ru_stime for u in usages)

    start, cpu_start = time.perf_counter(), cpu_seconds()
    if form == "plain":
        result = plain_loop(cfg, start)
    else:
        summary = engine.run(cfg, Path(out))
        result = {"val_acc": summary["final_val_acc"], "client_acc_mean": summary["client_acc"]["mean"],
                  "round_seconds": pd.read_csv(Path(out) / "metrics.csv")["wall_seconds"].tolist()}
    result |= {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu_start,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(result))


def spawn(form: str, cfg: dict, out: Path, threads: int) -> dict:
    cfg_path = out.with_suffix(".json")
    cfg_path.write_text(json.dumps(cfg | {"_threads": threads}))
    proc = subprocess.run([sys.executable, __file__, "--child", form, str(cfg_path), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{form} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(root: Path, num_clients: int, tile: int = 1) -> None:
    """Digits (optionally with the training set tiled) and an iid partition, written once."""
    import numpy as np

    from fedsq import data, partition, tracking

    folder = data.prepare("digits", root / "data")
    if tile > 1:
        for name in ("train_x", "train_y"):
            array = np.load(folder / f"{name}.npy")
            np.save(folder / f"{name}.npy", np.concatenate([array] * tile))
    labels = np.load(folder / "train_y.npy")
    parts = partition.make(labels, {"scheme": "iid", "num_clients": num_clients, "seed": 0})
    partition.write(parts, labels, root / "partition", num_classes=10)
    tracking.init_store(f"sqlite:///{root / 'mlflow.db'}")  # created once, as the pipeline's init rule does


def per_round(result: dict) -> float:
    """The median round's seconds, rounds 2 on: one-off costs (MLflow's start, which overlaps
    set-up and round 1 but may spill into round 2) are left to the fixed start."""
    seconds = result["round_seconds"]
    return statistics.median(b - a for a, b in zip(seconds[1:], seconds[2:]))


def fixed_start(pair: dict) -> float:
    """Seconds by which the engine ends later than the plain loop beyond its per-round cost."""
    engine, plain = pair["engine"], pair["plain"]
    rounds = len(engine["round_seconds"]) - 1
    return engine["round_seconds"][-1] - plain["round_seconds"][-1] - rounds * (per_round(engine) - per_round(plain))


def bench_time(repeats: int, rounds: int, threads: int) -> None:
    if rounds < 2:
        raise SystemExit("--rounds: at least 2 (the per-round figure starts at round 2)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, 10)
        cfg = base_config(root, rounds=rounds)
        pairs = []
        for i in range(repeats):
            pair = {}
            for form in ("plain", "engine") if i % 2 == 0 else ("engine", "plain"):
                pair[form] = result = spawn(form, cfg, root / f"{form}{i}", threads)
                print(f"  {form:6s} repeat {i}: {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU, "
                      f"{per_round(result):.2f} s per round from round 2, final val acc {result['val_acc']:.3f}, "
                      f"client acc {result['client_acc_mean']:.3f}", flush=True)
            pairs.append(pair)
        setting = f"resnet18 digits 10 clients {rounds} rounds, {threads} thread(s), median of {repeats} back-to-back pairs"
        plain, eng = ([per_round(p[form]) for p in pairs] for form in ("plain", "engine"))
        print(f"(a) per round (rounds 2-{rounds}), {setting}: plain loop {statistics.median(plain):.2f} s, engine "
              f"{statistics.median(eng):.2f} s, ratio {statistics.median(e / p for e, p in zip(eng, plain)):.3f} "
              "(target <= 1.05)")
        print(f"(a) fixed start, {setting}: {statistics.median(map(fixed_start, pairs)):.1f} s, the engine's end "
              "beyond its per-round cost (MLflow's imports and store set-up, once per run; not in the ratio)")
        # CPU time counts the engine's writer thread: what the whole run costs the machine.
        for clock in ("seconds", "cpu_seconds"):
            plain, eng = ([p[form][clock] for p in pairs] for form in ("plain", "engine"))
            print(f"    whole run, {clock.replace('_', ' ')}: plain loop {statistics.median(plain):.1f}, engine "
                  f"{statistics.median(eng):.1f}, ratio {statistics.median(e / p for e, p in zip(eng, plain)):.3f}")


def bench_memory(threads: int) -> None:
    peaks = {}
    for clients in (10, 1000):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            prepare(root, clients, tile=3)
            cfg = base_config(root, rounds=1, split={"scheme": "iid", "num_clients": clients, "seed": 0},
                              eval={"drift_every": 0, "test_every": 1})
            peaks[clients] = spawn("engine", cfg, root / "run", threads)["peak_rss_mib"]
            print(f"  {clients:5d} clients: peak RSS {peaks[clients]:.0f} MiB", flush=True)
    print(f"(b) memory, fedavg 1 round over the same data: 1000 clients {peaks[1000]:.0f} MiB vs 10 clients "
          f"{peaks[10]:.0f} MiB, ratio {peaks[1000] / peaks[10]:.3f} (target <= 1.1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["time", "memory"])
    parser.add_argument("--child", nargs=3, metavar=("FORM", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.only != "memory":
        bench_time(args.repeats, args.rounds, args.threads)
    if args.only != "time":
        bench_memory(args.threads)


if __name__ == "__main__":
    main()

"""Learning-rate calibration: a short training per candidate lr, best validation accuracy wins.

Fairness is the point: every method is calibrated in its own model form (DualCopy for
fedsq, the plain network for the others), because at toy scale the plain and DualCopy
models picked different rates and the gap that made looked like a method effect. Two modes:

- central: the paper's step; fine-tune on the pooled training set for a few epochs.
- federated: federated rounds of the method itself, scored by the best validation accuracy of
  any round; with ``rounds`` None, the run's whole budget on a tuning seed, which is how the
  evidence grid tunes each method (the lr that wins two central epochs need not win federated
  training). Each lr's validation curve is kept in the result.

A run config uses the pick with ``optimizer: {lr: calibrated}`` and ``calibration: <json>``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fedsq import records
from fedsq.engine import Diverged, Simulation, _fingerprint
from fedsq.files import write_atomic

DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
MODES = ("central", "federated")


def _score(cfg: dict, lr: float, mode: str, epochs: int, rounds: int) -> tuple[float | None, list[float], str]:
    """(validation accuracy reached with ``lr``, None if it diverged; the validation accuracy of
    each round from round 0 (federated mode); the model class trained).

    Federated mode scores the best round.
    """
    with tempfile.TemporaryDirectory() as work:
        sim = Simulation(cfg, Path(work))  # reseeded: every candidate starts from the same model
        form = type(sim.model).__name__
        state = sim.global_state()
        try:
            if mode == "central":
                pooled = np.arange(len(sim.splits["train"][1]))
                sim.train_client(0, pooled, 1, lr, state, epochs=epochs)
                return sim.evaluate("val")[0], [], form
            curve = [sim.evaluate("val")[0]]
            for r in tqdm(range(1, rounds + 1), desc=f"lr {lr:g}", unit="round", leave=False):
                state, _, _ = sim.train_round(r, lr, state)
                sim.model.load_state_dict(state)
                curve.append(sim.evaluate("val")[0])
            return max(curve[1:]), curve, form
        except Diverged:
            return None, curve if mode == "federated" else [], form


def _next_on_ladder(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the 1-3-10 ladder of learning rates (0.03 -> 0.1 -> 0.3 ...)."""
    ladder = sorted(round(a * 10.0**k, 12) for k in range(-8, 3) for a in (1, 3))
    return min(x for x in ladder if x > lr * 1.001) if up else max(x for x in ladder if x < lr * 0.999)


def _per_lr_key(record_key: dict) -> dict:
    """What one lr's score depends on: the calibration's key less which lrs it tries."""
    return record_key | {"calibration": {k: v for k, v in record_key["calibration"].items() if k not in ("lrs", "extend")}}


def calibrate(cfg: dict, out_json: Path, lrs=None, mode: str = "central", epochs: int = 2, rounds: int | None = 3,
              record: Path | None = None, extend: int = 0) -> dict:
    """Score each lr, write ``out_json`` and return {lr, mode, method, scores: {lr: val_acc}, ...}.

    ``rounds`` None: the run config's rounds. ``extend``: while the pick lies at an edge of the lrs
    tried, try the next lr beyond it on the 1-3-10 ladder, up to this many times per edge, so that
    a method is not held to the top (or bottom) of a grid that was too narrow for it.
    ``record``: a JSON file the result is copied to; a result there with this calibration's record
    key (``fedsq.records``) is taken instead of training. Each lr's score is kept as it comes in
    ``<record or out_json>.partial.json``, and taken from there or from the record wherever only the
    lrs tried differ, so that a stopped or widened calibration (an evidence sweep is hours of CPU)
    trains only the lrs it lacks, on any machine.
    """
    if mode not in MODES:
        raise ValueError(f"calibration mode {mode!r}: allowed are {', '.join(MODES)}")
    lrs = sorted(float(lr) for lr in (lrs or DEFAULT_LRS))
    if not lrs or lrs[0] <= 0:
        raise ValueError(f"lrs: {lrs} must be positive learning rates")
    cfg = copy.deepcopy(cfg)
    budget = {"epochs": epochs} if mode == "central" else {"rounds": rounds or cfg["rounds"]}
    cfg["optimizer"]["lr"] = lrs[0]  # a number: the key is of the candidates, below
    record_key = records.key(_fingerprint(cfg, None)) | {
        "calibration": {"lrs": lrs, "mode": mode, **budget} | ({"extend": extend} if extend else {})}
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(record or out_json).with_suffix(".partial.json")
    if record is not None and records.find([record], record_key):
        write_atomic(out_json, lambda tmp: tmp.write_text(Path(record).read_text()))
        partial.unlink(missing_ok=True)  # left beside a finished record by a copy of records from elsewhere
        print(f"{out_json}: reused the calibration recorded in {record} (same record key)")
        return json.loads(out_json.read_text())
    done = {"record_key": record_key, "scores": {}, "curves": {}}
    for earlier in (Path(record) if record else None, partial):  # scores of the same lrs, from a narrower grid too
        saved = json.loads(earlier.read_text()) if earlier is not None and earlier.is_file() else {}
        if saved.get("record_key") and _per_lr_key(saved["record_key"]) == _per_lr_key(record_key):
            done["scores"] |= saved["scores"]
            done["curves"] |= saved.get("curves", {})
            done["model_form"] = saved.get("model_form")
    scores = {float(lr): score for lr, score in done["scores"].items()}
    curves = {float(lr): curve for lr, curve in done["curves"].items()}
    model_form = done.get("model_form")
    todo, widened = [lr for lr in lrs if lr not in scores], {True: 0, False: 0}
    progress = tqdm(desc=f"calibrating {cfg['method']['name']} ({mode})", unit="lr", initial=len(lrs) - len(todo),
                    total=len(lrs))
    while True:
        for lr in todo:
            cfg["optimizer"]["lr"] = lr
            scores[lr], curves[lr], model_form = _score(cfg, lr, mode, epochs, budget.get("rounds", 0))
            done["scores"][str(lr)], done["curves"][str(lr)], done["model_form"] = scores[lr], curves[lr], model_form
            partial.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(partial, lambda tmp: tmp.write_text(json.dumps(done, indent=1)))
            progress.update()
        todo = []
        finite = {lr: s for lr, s in sorted(scores.items()) if s is not None}
        best = max(finite, key=finite.get) if finite else None  # ties go to the smaller lr (ascending order)
        for up, edge in ((True, max(scores)), (False, min(scores))):
            if best == edge and widened[up] < extend:
                widened[up] += 1
                todo.append(_next_on_ladder(edge, up))
                progress.total += 1
        if not todo:
            break
    progress.close()
    scores = dict(sorted(scores.items()))
    finite = {lr: s for lr, s in scores.items() if s is not None}
    if not finite:
        raise ValueError(f"lrs: every candidate diverged ({lrs}); try smaller learning rates")
    best = max(finite, key=finite.get)  # ties go to the smaller lr (dict order is ascending)
    result = {
        "lr": best,
        "mode": mode,
        "method": cfg["method"]["name"],
        "model_form": model_form,
        "scores": {str(lr): s for lr, s in scores.items()},
        "budget": budget,
        "dataset": cfg["dataset"],
        "backbone": cfg["backbone"],
        "weights": cfg["weights"],
        "split": cfg["split"],
        "seed": cfg["seed"],
        "bn": cfg["bn"],
        "config": cfg | {"optimizer": cfg["optimizer"] | {"lr": "calibrated"}},
        "record_key": record_key,
    }
    if mode == "federated":
        result["curves"] = {str(lr): curve for lr, curve in curves.items()}
    write_atomic(out_json, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    if record is not None:
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(record), lambda tmp: tmp.write_text(out_json.read_text()))
    partial.unlink(missing_ok=True)
    return result

import json

import numpy as np
import pytest

from fedsq import calibrate, config, data, engine


def make_cfg(digits_root, tmp_path, **extra):
    return config.load({
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "iid", "num_clients": 10}, "clients_per_round": 1, "rounds": 1,
        "device": "cpu", "eval": {"drift_every": 0}, "paths": {"data": str(digits_root)},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    } | extra)


def test_central_calibration_skips_a_diverging_lr_and_a_run_uses_its_pick(digits_root, tmp_path):
    out = tmp_path / "calibration" / "fedavg.json"
    result = calibrate.calibrate(make_cfg(digits_root, tmp_path), out, lrs=[1e9, 0.05], mode="central", epochs=1)
    assert result["lr"] == 0.05 and result["mode"] == "central" and result["method"] == "fedavg"
    # One epoch from scratch learns little, and how much depends on the thread count: check the
    # bookkeeping here (a score is a share of the validation images), learning in test_engine.
    assert result["scores"]["1000000000.0"] is None
    correct = result["scores"]["0.05"] * len(data.load("digits", digits_root).val.y)
    assert correct == pytest.approx(round(correct))
    assert result["model_form"] == "ResNet" and result["budget"] == {"epochs": 1}
    assert json.loads(out.read_text()) == result

    cfg = make_cfg(digits_root, tmp_path, optimizer={"lr": "calibrated"}, calibration=str(out), rounds=0)
    summary = engine.run(cfg, tmp_path / "run")
    assert summary["lr"] == 0.05 and summary["lr_source"].startswith("calibrated (central")
    assert summary["tags"]["lr_mode"] == "calibrated"


def test_federated_calibration_runs_the_method_in_its_own_model_form(digits_root, tmp_path):
    cfg = make_cfg(digits_root, tmp_path, method={"name": "fedsq"})
    result = calibrate.calibrate(cfg, tmp_path / "fedsq.json", lrs=[0.01, 0.1], mode="federated", rounds=1)
    assert result["mode"] == "federated" and result["budget"] == {"rounds": 1}
    assert result["model_form"] == "DualCopy"
    assert set(result["scores"]) == {"0.01", "0.1"} and result["lr"] in (0.01, 0.1)
    assert result["scores"][str(result["lr"])] == max(result["scores"].values())


def test_bad_mode_is_an_error(digits_root, tmp_path):
    with pytest.raises(ValueError, match="calibration mode 'grid': allowed are central, federated"):
        calibrate.calibrate(make_cfg(digits_root, tmp_path), tmp_path / "x.json", mode="grid")


@pytest.mark.slow
def test_all_candidates_diverging_is_an_error(digits_root, tmp_path):
    cfg = make_cfg(digits_root, tmp_path)
    with pytest.raises(ValueError, match="every candidate diverged"):
        calibrate.calibrate(cfg, tmp_path / "x.json", lrs=[1e9], epochs=1)
    assert not (tmp_path / "x.json").exists()


def test_a_stopped_sweep_continues_at_the_next_lr_and_a_recorded_one_is_reused(digits_root, tmp_path, monkeypatch):
    scored = []

    def fake_score(cfg, lr, mode, epochs, rounds):
        if lr == 0.1 and "stopped" not in scored:
            scored.append("stopped")
            raise KeyboardInterrupt  # the job is killed while it tries the second lr
        scored.append(lr)
        return lr, [0.1, lr], "ResNet"

    monkeypatch.setattr(calibrate, "_score", fake_score)
    cfg, record = make_cfg(digits_root, tmp_path), tmp_path / "records" / "fedavg.json"
    sweep = dict(lrs=[0.01, 0.1], mode="federated", rounds=2, record=record)
    with pytest.raises(KeyboardInterrupt):
        calibrate.calibrate(cfg, tmp_path / "a.json", **sweep)
    assert not record.exists() and json.loads(record.with_suffix(".partial.json").read_text())["scores"] == {"0.01": 0.01}

    result = calibrate.calibrate(cfg, tmp_path / "b.json", **sweep)
    assert scored == [0.01, "stopped", 0.1]  # 0.01 was not trained again
    assert result["lr"] == 0.1 and result["curves"] == {"0.01": [0.1, 0.01], "0.1": [0.1, 0.1]}
    assert json.loads(record.read_text()) == result and not record.with_suffix(".partial.json").exists()

    stale = record.with_suffix(".partial.json")  # as records copied over from another sitting may hold
    stale.write_text(json.dumps({"scores": {"0.01": 0.01}}))
    assert calibrate.calibrate(cfg, tmp_path / "c.json", **sweep) == result
    assert scored == [0.01, "stopped", 0.1] and not stale.exists()  # reused whole; the stale partial gone
    other = calibrate.calibrate(cfg, tmp_path / "d.json", **sweep | {"rounds": 3})  # another budget: another key
    assert other["budget"] == {"rounds": 3} and scored[3:] == [0.01, 0.1]


def test_a_pick_at_the_edge_widens_the_grid_and_a_narrower_grids_scores_are_kept(digits_root, tmp_path, monkeypatch):
    scored = []

    def peak_at(best):
        def fake_score(cfg, lr, mode, epochs, rounds):
            scored.append(lr)
            return 1 - abs(np.log10(lr / best)), [0.1], "ResNet"
        return fake_score

    cfg, record = make_cfg(digits_root, tmp_path), tmp_path / "records" / "fedavg.json"
    monkeypatch.setattr(calibrate, "_score", peak_at(0.1))
    narrow = calibrate.calibrate(cfg, tmp_path / "a.json", lrs=[0.01, 0.03], mode="federated", rounds=2, record=record)
    assert narrow["lr"] == 0.03 and scored == [0.01, 0.03]  # at the edge, and nothing beyond it tried

    # The same sweep allowed to widen: 0.01 and 0.03 are kept, 0.1 and 0.3 tried, then 0.1 is inside.
    wide = calibrate.calibrate(cfg, tmp_path / "b.json", lrs=[0.01, 0.03], mode="federated", rounds=2,
                               record=record, extend=2)
    assert scored == [0.01, 0.03, 0.1, 0.3] and wide["lr"] == 0.1
    assert list(wide["scores"]) == ["0.01", "0.03", "0.1", "0.3"]

    scored.clear()
    monkeypatch.setattr(calibrate, "_score", peak_at(0.001))  # at the bottom edge: at most `extend` steps down
    low = calibrate.calibrate(cfg, tmp_path / "c.json", lrs=[0.03, 0.1], mode="federated", rounds=1, extend=1)
    assert scored == [0.03, 0.1, 0.01] and low["lr"] == 0.01

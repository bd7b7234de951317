"""Your own backbone and data, end to end on the CPU: models by name train with FedAvg and FedSQ,
a network FedSQ cannot gate is refused, and an image folder and an npz file go through the CLI."""

import json

import numpy as np
import pytest
import yaml

from fedsq import cli, config, engine
from tests.test_data import image_folder

TINY = {  # 2 clients, one of them trained for 1 round; the probe and evaluation kept small
    "weights": "scratch", "image_size": 32, "split": {"scheme": "iid", "num_clients": 2}, "clients_per_round": 1,
    "rounds": 1, "device": "cpu", "eval": {"drift_every": 0, "probe_size": 8},
}


def tiny_cfg(data_root, mlflow_uri, **keys):
    return config.load(TINY | {"paths": {"data": str(data_root)}, "tracking": {"uri": mlflow_uri}} | keys)


@pytest.mark.parametrize("method", ["fedavg", "fedsq"])
@pytest.mark.parametrize("backbone", ["torchvision/vgg11_bn", "timm/resnet10t"])
def test_models_by_name_train_one_round(digits_root, mlflow_uri, tmp_path, backbone, method):
    summary = engine.run(tiny_cfg(digits_root, mlflow_uri, backbone=backbone, method={"name": method}), tmp_path)
    assert summary["rounds"] == 1 and summary["tags"]["backbone"] == backbone
    assert 0 <= summary["final_val_acc"] <= 1


def test_fedsq_refuses_a_network_it_cannot_gate_and_fedavg_runs_it(digits_root, mlflow_uri, tmp_path):
    cfg = tiny_cfg(digits_root, mlflow_uri, backbone="torchvision/mobilenet_v3_small", method={"name": "fedsq"})
    with pytest.raises(ValueError, match="module 'features.0.2' is a Hardswish"):
        engine.run(cfg, tmp_path / "fedsq")
    assert not (tmp_path / "fedsq" / "metrics.csv").exists()
    cfg = tiny_cfg(digits_root, mlflow_uri, backbone="torchvision/mobilenet_v3_small", method={"name": "fedavg"})
    assert engine.run(cfg, tmp_path / "fedavg")["rounds"] == 1


def run_through_the_cli(dataset, tmp_path, mlflow_uri, backbone):
    assert cli.main(["data", "prepare", dataset, "--root", str(tmp_path / "data")]) == 0
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump(TINY | {"dataset": dataset, "backbone": backbone, "method": {"name": "fedsq"},
                                                 "paths": {"data": str(tmp_path / "data")}}))
    out = tmp_path / "run"
    assert cli.main(["run", "--config", str(run_config), "--set", f"tracking.uri={mlflow_uri}", "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def test_an_image_folder_through_the_cli(tmp_path, mlflow_uri):
    folder = image_folder(tmp_path / "pets")
    summary = run_through_the_cli(f"imagefolder:{folder}", tmp_path, mlflow_uri, "resnet18")
    assert summary["tags"]["dataset"] == f"imagefolder:{folder}"
    assert json.loads((tmp_path / "data" / "pets" / "meta.json").read_text())["classes"] == ["cat", "dog", "owl"]


def test_an_npz_file_through_the_cli(tmp_path, mlflow_uri):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "blobs.npz", x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y_train=np.arange(40) % 2)
    summary = run_through_the_cli(f"npz:{tmp_path / 'blobs.npz'}", tmp_path, mlflow_uri, "timm/resnet10t")
    assert summary["rounds"] == 1 and (tmp_path / "data" / "blobs" / "meta.json").exists()


def test_a_bad_dataset_name_is_one_clear_cli_line(tmp_path, capsys):
    assert cli.main(["data", "prepare", f"imagefolder:{tmp_path / 'missing'}", "--root", str(tmp_path)]) == 2
    assert "no train/ folder" in capsys.readouterr().err

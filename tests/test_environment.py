"""The environment a run records: versions and device name, as MLflow tags of every run."""

import importlib.metadata
import platform

import torch
from mlflow import MlflowClient

from fedsq import config, engine, environment

KEYS = {f"env.{k}" for k in ("python", "torch", "torchvision", "timm", "mlflow", "snakemake", "cuda", "cudnn", "device")}


def test_describe_names_versions_and_the_cpu(monkeypatch):
    monkeypatch.setattr(environment, "PACKAGES", (*environment.PACKAGES, "no-such-package"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    tags = environment.describe(torch.device("cpu"))
    assert set(tags) == KEYS | {"env.no-such-package", "env.cuda_visible_devices"}
    assert all(isinstance(v, str) and v for v in tags.values())
    assert tags["env.python"] == platform.python_version()
    assert tags["env.torch"] == importlib.metadata.version("torch") and tags["env.no-such-package"] == "none"
    assert tags["env.cuda"] == (torch.version.cuda or "none")
    assert tags["env.device"] == environment.cpu_name() != "unknown"
    assert tags["env.cuda_visible_devices"] == "3"


def test_a_run_carries_the_environment_tags(digits_root, mlflow_uri, tmp_path):
    cfg = config.load({  # round 0 only: the initial model evaluated, tracked and summarised
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "iid", "num_clients": 2}, "rounds": 0, "device": "cpu",
        "eval": {"drift_every": 0, "probe_size": 8}, "paths": {"data": str(digits_root)}, "tracking": {"uri": mlflow_uri},
    })
    summary = engine.run(cfg, tmp_path)
    tags = MlflowClient(mlflow_uri).get_run(summary["mlflow_run_id"]).data.tags
    assert KEYS <= set(tags) and tags["env.device"] == environment.cpu_name()

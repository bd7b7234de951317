"""A run that asks for CUDA and cannot have it stops at once, in one line naming torch's CUDA build
and the driver; `make gpu-smoke` fails where the driver shows a GPU that torch cannot use, and
skips where there is none. A GPU node is faked: a tiny `nvidia-smi` first on PATH, and
torch.cuda.is_available patched to False."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedsq import cli, data, engine, environment

ROOT = Path(__file__).resolve().parents[1]
GPU_LINE = "535.104.05, NVIDIA H200"  # a driver too old for CUDA 13 wheels


def fake_node(tmp_path: Path, nvidia_smi: bool) -> str:
    """A PATH with a fake nvidia-smi (answering the query fedsq makes), or with none."""
    folder = tmp_path / "bin"
    folder.mkdir()
    if nvidia_smi:
        script = folder / "nvidia-smi"
        script.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=driver_version,name" ] || exit 9\n'
                          f'echo "{GPU_LINE}"\n')
        script.chmod(0o755)
    # Only the fake folder and the basic tools: a real nvidia-smi elsewhere on PATH must not answer.
    return os.pathsep.join([str(folder), "/usr/bin", "/bin"])


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML not importable: nvidia-smi is the only witness


def test_cuda_asked_for_and_unusable_names_torchs_build_and_the_driver(tmp_path, monkeypatch, no_cuda):
    monkeypatch.setenv("PATH", fake_node(tmp_path, nvidia_smi=True))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ValueError) as err:
        engine.resolve_device("cuda")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("device: 'cuda' requested but torch cannot use a GPU here: ")
    assert f"torch {torch.__version__} is built for CUDA 13.0; NVIDIA driver 535.104.05 with 1 GPU(s) (NVIDIA H200)" in message
    assert engine.resolve_device("auto") == torch.device("cpu")  # asked for either: no error


def test_without_a_driver_the_error_says_none_was_found(tmp_path, monkeypatch, no_cuda):
    monkeypatch.setenv("PATH", fake_node(tmp_path, nvidia_smi=False))
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match=r"is a CPU-only build; no GPU reported by nvidia-smi or NVML \(device: cpu"):
        engine.resolve_device("cuda")


def test_an_nvidia_smi_that_finds_no_gpu_reports_none(tmp_path, monkeypatch, no_cuda):
    path = fake_node(tmp_path, nvidia_smi=False)
    script = tmp_path / "bin" / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")  # what a driver without GPUs says
    script.chmod(0o755)
    monkeypatch.setenv("PATH", path)
    assert environment.nvidia_gpus() == (None, [])


@pytest.mark.parametrize("command", ["run", "calibrate"])
def test_fedsq_run_and_calibrate_stop_before_building_anything(tmp_path, monkeypatch, capsys, no_cuda, command):
    monkeypatch.setenv("PATH", fake_node(tmp_path, nvidia_smi=True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no slot to take: the test is about the device
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data loaded for a run that cannot start"))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "dataset": "digits", "device": "cuda", "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    out = tmp_path / "out"
    assert cli.main([command, "--config", str(config_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch cannot use a GPU here" in err and "driver 535.104.05" in err
    assert not out.exists()


def smoke(tmp_path: Path, nvidia_smi: bool) -> subprocess.CompletedProcess:
    """scripts/gpu_smoke.py on this CPU-only torch, on a fake node."""
    env = os.environ | {"PATH": fake_node(tmp_path, nvidia_smi), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts/gpu_smoke.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_gpu_smoke_fails_where_the_driver_sees_a_gpu_torch_cannot_use(tmp_path):
    result = smoke(tmp_path, nvidia_smi=True)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL ") and "NVIDIA H200" in lines[0] and "535.104.05" in lines[0]


def test_gpu_smoke_skips_cleanly_without_a_gpu(tmp_path):
    result = smoke(tmp_path, nvidia_smi=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SKIPPED: ") and len(result.stdout.strip().splitlines()) == 1

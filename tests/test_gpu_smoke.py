"""What of scripts/gpu_smoke.py a CPU can check: its fixed-gate reference (check 1) is DualCopy's
function, computed another way, on the three backbones; its own regimes (check 2) are DualCopy's
in fp32; the resume check starts only from a SIGKILL with a trained round on disk. (Its GPU
detection: tests/test_device.py.)"""

import copy
import importlib.util
import signal
from pathlib import Path

import pytest
import torch

from fedsq import models
from fedsq.dualcopy import DualCopy, PoolRegime, record_regimes

spec = importlib.util.spec_from_file_location("gpu_smoke", Path(__file__).resolve().parents[1] / "scripts/gpu_smoke.py")
smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke)


def _backbone(name):
    torch.manual_seed(0)
    weights = models.efficientnet_lite0_pip_file() if name == "efficientnet_lite0" else None
    return models.build(name, 5, weights).eval()


@pytest.mark.parametrize("name, size", [("alexnet", 63), ("resnet18", 32), ("efficientnet_lite0", 32)])
def test_the_fixed_gate_reference_computes_dualcopys_function(name, size):
    model = _backbone(name)
    structural = copy.deepcopy(model)
    dual = DualCopy(model, gate_maxpool=True).eval()
    smoke.move_away(dual.quantitative)
    x = torch.randn(4, 3, size, size)
    with smoke.exact_fp32():
        expected = smoke.fixed_gate_reference(structural, dual.quantitative, x)
        assert smoke.relative_gap(dual(x), expected) < 1e-5
        # Gating happened, and with S's gates: Q's own, or another S's, give other logits.
        assert smoke.relative_gap(dual.quantitative(x), expected) > 1e-2
        other = copy.deepcopy(structural)
        smoke.move_away(other, scale=0.5)
        assert smoke.relative_gap(smoke.fixed_gate_reference(other, dual.quantitative, x), expected) > 1e-2


@pytest.mark.parametrize("name, size", [("alexnet", 63), ("efficientnet_lite0", 32)])
def test_the_smokes_regimes_are_dualcopys_and_bf16_moves_a_few_of_them(name, size):
    model = _backbone(name)
    x = torch.randn(4, 3, size, size)
    with smoke.exact_fp32():
        ours = [smoke.regime(module, z) for module, z in smoke.gate_calls(model, x)]
        theirs = record_regimes(model, x, gate_maxpool=True)
    assert len(ours) == len(theirs)
    for r, regime in zip(ours, theirs):
        assert torch.equal(r, regime.indices if isinstance(regime, PoolRegime) else regime.codes())
    # bf16 autocast on the CPU: S's partition moves, but only near its boundaries.
    assert 0 < smoke.bf16_partition_share(model, x) < 0.02


@pytest.mark.parametrize("returncode, round, ok", [
    (-signal.SIGKILL, 1, True),
    (-signal.SIGKILL, 4, True),
    (-signal.SIGKILL, 0, False),  # killed before a trained round was saved: resumes nothing trained
    (-signal.SIGKILL, None, False),  # no checkpoint at all
    (1, 2, False),  # crashed by itself
    (0, 6, False),  # finished before the kill
    (-signal.SIGTERM, 3, False),  # unwound (KeyboardInterrupt), not killed
])
def test_the_resume_check_starts_only_from_a_sigkill_after_a_trained_round(returncode, round, ok):
    assert smoke.killed_after_a_trained_round(returncode, round) is ok

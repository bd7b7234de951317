"""Gate agreement with the pretrained reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsq import models
from fedsq.drift import gate_agreement
from fedsq.dualcopy import DualCopy


class TwoGates(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        return F.relu6(self.fc2(torch.relu(self.bn(self.fc1(x)))))


def test_agreement_counts_units_over_all_call_sites():
    torch.manual_seed(0)
    reference = TwoGates().eval()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.fc2.bias.add_(100.0)  # every unit of the second gate now sits at 6; the first gate is unchanged
    x = torch.randn(10, 3)
    with torch.no_grad():
        z2 = reference.fc2(torch.relu(reference.bn(reference.fc1(x))))
    expected = (10 * 4 + int((z2 >= 6).sum())) / (10 * 4 + 10 * 2)
    assert gate_agreement(model, reference, x) == pytest.approx(expected)
    assert gate_agreement(copy.deepcopy(reference), reference, x) == 1.0


def test_reference_bn_uses_the_reference_statistics():
    torch.manual_seed(1)
    reference = TwoGates().eval()
    model = copy.deepcopy(reference)
    model.bn.running_mean.add_(3.0)
    x = torch.randn(32, 3)
    assert gate_agreement(model, reference, x) < 1.0
    assert gate_agreement(model, reference, x, reference_bn=True) == 1.0
    assert model.bn.running_mean.mean() > 2.0  # the model itself is untouched


def test_dualcopy_is_judged_by_its_quantitative_copys_own_gates():
    torch.manual_seed(1)
    reference = TwoGates().eval()
    dual = DualCopy(copy.deepcopy(reference))
    x = torch.randn(32, 3)
    assert gate_agreement(dual, reference, x) == 1.0  # untouched, Q is the pretrained network
    dual.quantitative.bn.running_mean.add_(3.0)
    # S (the pretrained copy) still gates the forward pass, Q's own gates have moved
    assert gate_agreement(dual, reference, x) == gate_agreement(dual.quantitative, reference, x) < 1.0
    assert gate_agreement(dual, reference, x, reference_bn=True) == 1.0


def test_trained_models_drift_whether_gated_by_the_pretrained_copy_or_not():
    torch.manual_seed(2)
    reference = models.build("resnet18", 4, None).eval()
    dual, plain = DualCopy(copy.deepcopy(reference)), copy.deepcopy(reference)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    for net in (dual, plain):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        net.train()
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        assert 0.0 < gate_agreement(net, reference, x) < 1.0
        assert net.training  # its mode is restored


def test_different_architectures_are_an_error():
    with pytest.raises(ValueError, match="not the same architecture"):
        gate_agreement(TwoGates(), nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.randn(2, 3))


def test_agreement_is_computed_in_fp32_under_a_bf16_autocast():
    torch.manual_seed(0)
    reference = models.build("resnet18", 5, None).eval()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(8, 3, 32, 32)
    fp32 = gate_agreement(model, reference, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gate_agreement(model, reference, x) == fp32
        assert gate_agreement(copy.deepcopy(reference), reference, x) == 1.0

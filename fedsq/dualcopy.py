"""DualCopy: FedSQ's two-copy model with gates fixed by a frozen structural copy.

The structural copy S (frozen, eval mode, never trained or sent) computes, for each input,
the regime of every piecewise-linear gate: ReLU (off | linear), ReLU6 and other hardtanh
clamps (low | linear | high) and, optionally, max-pooling (S's argmax). The quantitative
copy Q runs the same architecture on the same input with each gate replaced by S's regime,
so Q is affine in its weights' values within S's fixed partition of the input space.

Gates are intercepted as *calls* with a ``TorchFunctionMode``, so activation modules and
functional calls are handled alike, and a module called at several places in one forward
pass (torchvision's ``BasicBlock.relu``) gets one regime per call site: S records regimes
in call order, Q consumes them in the same order. ``RegimeCache`` computes S's regimes of a
whole split once, to pass to ``DualCopy.forward`` instead of running S in every forward pass.

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

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
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


# Activation modules DualCopy gates (ReLU6 is a Hardtanh). Any other makes the network either
# not piecewise linear (GELU, SiLU, Hardswish, Sigmoid gates, Mish, ELU, Tanh...) or piecewise
# linear with regimes DualCopy does not fix (LeakyReLU, PReLU): Q would run it on its own
# pre-activations, and FedSQ would silently be something else.
GATED_ACTIVATIONS = (nn.ReLU, nn.Hardtanh)
# Where activation modules live: torch.nn's, and timm's own (timm.layers.activations*).
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "timm.layers.activations")


def activations(model: nn.Module) -> dict[type, str]:
    """Activation module classes in ``model``, in order of appearance, each with its first module's name."""
    found: dict[type, str] = {}
    for name, module in model.named_modules():
        if type(module).__module__.startswith(_ACTIVATION_MODULES):
            found.setdefault(type(module), name)
    return found


def check_gateable(model: nn.Module) -> None:
    """Refuse a network whose activations are not all ones DualCopy gates, before any training.
    Activation modules are checked; an activation called as a function is not seen."""
    for kind, name in activations(model).items():
        if not issubclass(kind, GATED_ACTIVATIONS):
            raise ValueError(
                f"FedSQ needs a piecewise-linear network whose activations DualCopy gates (ReLU, ReLU6, "
                f"Hardtanh): module {name!r} is a {kind.__name__}; FedAvg and FedProx run on it"
            )


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
    kind = "activation"

    @property
    def shape(self) -> torch.Size:
        return self.linear.shape

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
        # S's masks are fp32 (``full_precision``); Q may compute in bf16 under autocast.
        linear = self.linear.to(z.dtype)
        clamped = None if self.clamped is None else self.clamped.to(z.dtype)
        if inplace:
            z.mul_(linear)
            return z if clamped is None else z.add_(clamped)
        return z * linear if clamped is None else torch.addcmul(clamped, z, linear)

    def codes(self) -> Tensor:
        """int8 per unit: 0 at the low clamp, 1 linear, 2 at the high clamp."""
        code = self.linear.to(torch.int8)
        if self.clamped is not None:
            code += 2 * ((self.linear == 0) & (self.clamped == self.high))
        return code


@dataclass
class PoolRegime:
    """Regime of one max-pool call: the argmax index S picked in each window (into the flattened
    H x W of an input ``input_width`` wide), and the call's pooling arguments."""

    indices: Tensor
    pooling: dict
    input_width: int
    kind = "max-pool"

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
            self.regimes.append(PoolRegime(indices, pool_args, z.shape[-1]))
            return (out, indices) if return_indices else out
        return func(*args, **kwargs)


class ApplyRegimes(TorchFunctionMode):
    """Run a model with each gate call replaced by the next regime: recorded, or a RegimeCache's."""

    def __init__(self, regimes: list, gate_maxpool: bool = False):
        super().__init__()
        self.regimes = regimes
        self.gate_maxpool = gate_maxpool
        self.used = 0

    def _next(self, kind: str):
        if self.used == len(self.regimes):
            raise RuntimeError(
                f"the gated model called more gates than the {len(self.regimes)} its structural copy recorded"
            )
        regime = self.regimes[self.used]
        self.used += 1
        if regime.kind != kind:
            raise RuntimeError(f"gate call {self.used} is a {kind} gate, its structural copy's a {regime.kind} gate")
        return regime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ACTIVATIONS:
            z, _, _, inplace = _ACTIVATIONS[func](*args, **kwargs)
            regime = self._next("activation")
            if regime.shape != z.shape:
                raise RuntimeError(
                    f"gate call {self.used} has shape {tuple(z.shape)}, its structural copy's {tuple(regime.shape)}"
                )
            return regime.apply(z, inplace)
        if self.gate_maxpool and func is F.max_pool2d:
            z, _, return_indices = _max_pool2d(*args, **kwargs)
            return self._next("max-pool").apply(z, return_indices)
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None and self.used != len(self.regimes):
            raise RuntimeError(
                f"the gated model used {self.used} of the {len(self.regimes)} gates its structural copy recorded"
            )


@contextlib.contextmanager
def full_precision(device_type: str):
    """fp32 arithmetic whatever autocast the caller runs under, and no TF32 (cuDNN convolutions
    in fp32 on Ampere and later use TF32 unless told not to): S's partition is then that of its
    fp32 weights, the same on every GPU, batch size and CPU, not a rounding of it."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        # (a device without autocast, such as meta for counting FLOPs, computes as it is given)
        with torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
                else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


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
        check_gateable(model)
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

    def structural_regimes(self, x: Tensor) -> list[ClampRegime | PoolRegime]:
        """S's regimes on ``x``, in gate call order (S runs on a channels-last copy of images), in
        ``full_precision``: training's autocast, if any, does not reach them."""
        images = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        with full_precision(x.device.type):
            return record_regimes(self.structural, images, self.gate_maxpool)

    def forward(self, x: Tensor, regimes: list | None = None) -> Tensor:
        """Q on ``x`` gated by S's regimes: computed here, or given (``RegimeCache``'s, for x's samples)."""
        with ApplyRegimes(self.structural_regimes(x) if regimes is None else regimes, self.gate_maxpool):
            return self.quantitative(x)

    def extra_repr(self) -> str:
        return f"gate_maxpool={self.gate_maxpool}"


# Regime cache. S is frozen, its BatchNorm normalises with fixed statistics (a sample's regimes do
# not depend on its batch) and a sample's input never changes (no augmentation): S's regimes
# for a sample are the same in every round, so they are computed once and stored compactly.


def _byte_codes(bits: int) -> Tensor:
    """Row b: the 8 / ``bits`` codes packed into byte b, lowest bits first."""
    return (torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> _shifts(bits)) & (2**bits - 1)


def _shifts(bits: int) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8)


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@dataclass
class _CachedActivation:
    """One activation call's regime codes (``ClampRegime.codes``) for every sample of a split:
    one bit per unit for ReLU (two regimes), two for clamps with an upper bound (three). Packed
    in the memory order of Q's activations, which is that of the model's input (channels-last
    or not), so that masks unpack in the layout Q computes in: on CPU an elementwise op on
    tensors of two layouts takes a slow path (EfficientNet-Lite0: 4 % of a training step)."""

    low: float
    high: float | None
    shape: torch.Size  # one sample's mask, logical
    channels_last: bool  # packed as N x H x W x C
    packed: Tensor  # samples x ceil(units / per byte), uint8
    tables: dict = field(default_factory=dict, repr=False)  # dtype -> [linear, clamped]: each byte's masks

    @classmethod
    def empty(cls, regime: ClampRegime, samples: int, channels_last: bool) -> _CachedActivation:
        channels_last = channels_last and regime.linear.dim() == 4
        cached = cls(regime.low, regime.high, regime.shape[1:], channels_last, packed=None)
        width = -(-cached.shape.numel() * cached.bits // 8)
        cached.packed = torch.empty(samples, width, dtype=torch.uint8, device=regime.linear.device)
        return cached

    @property
    def bits(self) -> int:
        return 1 if self.high is None else 2

    def fill(self, start: int, regime: ClampRegime) -> None:
        codes = regime.codes().to(torch.uint8)
        codes = (codes.permute(0, 2, 3, 1) if self.channels_last else codes).reshape(len(codes), -1)
        per_byte = 8 // self.bits
        codes = F.pad(codes, (0, per_byte * self.packed.shape[1] - codes.shape[1])).view(len(codes), -1, per_byte)
        shifts = _shifts(self.bits).to(codes.device)
        self.packed[start:start + len(codes)] = (codes << shifts).sum(2, dtype=torch.uint8)  # bits are disjoint

    def __getitem__(self, index: Tensor | slice) -> _PackedActivation:
        return _PackedActivation(self, self.packed[index])

    def unpack(self, packed: Tensor, dtype: torch.dtype) -> ClampRegime:
        """The regime of a batch's packed codes, as masks of ``dtype``: one table lookup per mask."""
        if dtype not in self.tables:
            codes = _byte_codes(self.bits).to(packed.device)
            self.tables[dtype] = [(codes == 1).to(dtype)]
            if self.high is not None:
                clamp = torch.where(codes == 0, self.low, torch.where(codes == 2, self.high, 0.0))
                self.tables[dtype].append(clamp.to(dtype))
        masks = [self._masks(packed, table) for table in self.tables[dtype]]
        return ClampRegime(self.low, self.high, masks[0], masks[1] if len(masks) > 1 else None)

    def _masks(self, packed: Tensor, table: Tensor) -> Tensor:
        units = self.shape.numel()
        values = table.index_select(0, packed.flatten().int()).view(len(packed), -1)[:, :units]
        if not self.channels_last:
            return values.reshape(len(packed), *self.shape)
        c, h, w = self.shape
        return values.reshape(len(packed), h, w, c).permute(0, 3, 1, 2)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


@dataclass
class _PackedActivation:
    """A batch's cached regime of one activation call, unpacked when applied, into Q's dtype there."""

    cached: _CachedActivation
    packed: Tensor
    kind = "activation"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.packed), *self.cached.shape))

    def apply(self, z: Tensor, inplace: bool) -> Tensor:
        return self.cached.unpack(self.packed, z.dtype).apply(z, inplace)


@dataclass
class _CachedPool:
    """One max-pool call's argmax for every sample of a split, as its offset within the window (uint8)."""

    pooling: dict
    input_width: int
    offsets: Tensor  # samples x C x H_out x W_out

    @classmethod
    def empty(cls, regime: PoolRegime, samples: int) -> _CachedPool:
        kernel = _pair(regime.pooling["kernel_size"])
        if kernel[0] * kernel[1] > 256:
            raise ValueError(f"max-pool kernel {kernel}: window offsets do not fit in a byte; use regime_cache: false")
        offsets = torch.empty(samples, *regime.indices.shape[1:], dtype=torch.uint8, device=regime.indices.device)
        return cls(regime.pooling, regime.input_width, offsets)

    def _windows(self) -> tuple[Tensor, Tensor, int, int, int]:
        """(top row, left column) of each output's window, the kernel width and the dilation."""
        pooling = self.pooling
        _, kernel_w = _pair(pooling["kernel_size"])
        stride_h, stride_w = _pair(pooling["stride"] or pooling["kernel_size"])
        pad_h, pad_w = _pair(pooling["padding"])
        dilation_h, dilation_w = _pair(pooling["dilation"])
        out_h, out_w = self.offsets.shape[-2:]
        device = self.offsets.device
        top = torch.arange(out_h, device=device).view(-1, 1) * stride_h - pad_h
        left = torch.arange(out_w, device=device) * stride_w - pad_w
        return top, left, kernel_w, dilation_h, dilation_w

    def fill(self, start: int, regime: PoolRegime) -> None:
        top, left, kernel_w, dilation_h, dilation_w = self._windows()
        row, col = regime.indices // self.input_width, regime.indices % self.input_width
        offsets = (row - top) // dilation_h * kernel_w + (col - left) // dilation_w
        self.offsets[start:start + len(offsets)] = offsets

    def __getitem__(self, index: Tensor | slice) -> PoolRegime:
        top, left, kernel_w, dilation_h, dilation_w = self._windows()
        offsets = self.offsets[index].long()
        row, col = top + offsets // kernel_w * dilation_h, left + offsets % kernel_w * dilation_w
        return PoolRegime(row * self.input_width + col, self.pooling, self.input_width)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes


class RegimeCache:
    """S's regimes for every sample of one split, computed once and kept packed on its device:
    a bit per ReLU unit, two per unit of a clamp with an upper bound (ReLU6), a byte per
    max-pool output (ResNet-18 at 32 px: 5.9 KB a sample, 10 KB with ``gate_maxpool``).

    Built from ``batches``, the split's ``samples`` model inputs in order. ``cache[index]`` (a
    tensor of sample indices or a slice of the split) is the regimes of those samples, for
    ``DualCopy.forward(x, regimes)``.
    """

    def __init__(self, dual: DualCopy, batches: Iterable[Tensor], samples: int):
        self.gates: list[_CachedActivation | _CachedPool] = []
        start = 0
        for x in batches:
            regimes = dual.structural_regimes(x)
            if start == 0:
                channels_last = _channels_last(x)  # Q computes in the layout of its input
                self.gates = [_CachedActivation.empty(r, samples, channels_last) if r.kind == "activation"
                              else _CachedPool.empty(r, samples) for r in regimes]
            for gate, regime in zip(self.gates, regimes):
                gate.fill(start, regime)
            start += len(x)
        if start != samples:
            raise ValueError(f"RegimeCache: the batches hold {start} samples, not {samples}")

    def __getitem__(self, index: Tensor | slice) -> list:
        return [gate[index] for gate in self.gates]

    @property
    def nbytes(self) -> int:
        return sum(gate.nbytes for gate in self.gates)

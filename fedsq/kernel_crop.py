"""Zero-padded convolutions on feature maps smaller than their kernel: only the taps that meet the input.

At 32 px, EfficientNet-Lite0's last stages run 5x5 and 3x3 depthwise kernels on 2x2 and 1x1
feature maps (ResNet-18's last 3x3 convolutions on 1x1), so most taps only ever multiply the zero
padding. oneDNN's backward pass on CPU spends as long on them as on real work: 18 ms a call for
a 5x5 depthwise convolution of 1152 channels at 1x1, about 0.9 MFLOP (a third of the training
step). Cropping the kernel to the taps that meet the input gives the same sums (the dropped terms
are products with zero) and the same gradients (the dropped taps' are zero), in a fraction of the
time (benchmarks/bench_round_cost.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same_arg
from torch import Tensor, nn


def _crop(size: int, kernel: int, stride: int, before: int, after: int) -> tuple[int, int, int, int]:
    """Along one axis: the first and last kernel tap that can meet the input, and the padding
    (before, after; after may be negative: input that no output reaches) that keeps the output size."""
    outputs = (size + before + after - kernel) // stride + 1
    first = max(0, before - (outputs - 1) * stride)  # earlier taps meet the padding before, for every output
    last = min(kernel - 1, size - 1 + before)  # later taps meet the padding after
    before -= first
    return first, last, before, (outputs - 1) * stride + last - first + 1 - size - before


def cropped_conv2d(conv: nn.Conv2d, x: Tensor, padding: tuple[int, int, int, int]) -> Tensor | None:
    """``conv`` (dilation 1) on ``x`` zero-padded by ``padding`` (left, right, top, bottom, as
    F.pad), computed with the taps that meet ``x``; None when every tap does."""
    (kh, kw), (h, w) = conv.kernel_size, x.shape[-2:]
    if h >= kh and w >= kw:
        return None  # the usual case (no model of ours crops there), kept off the step's Python path
    left, right, top, bottom = padding
    if h + top + bottom < kh or w + left + right < kw:
        return None  # no output: the convolution's own error says so
    first_row, last_row, top, bottom = _crop(h, kh, conv.stride[0], top, bottom)
    first_col, last_col, left, right = _crop(w, kw, conv.stride[1], left, right)
    if (first_row, last_row, first_col, last_col) == (0, kh - 1, 0, kw - 1):
        return None
    weight = conv.weight[:, :, first_row:last_row + 1, first_col:last_col + 1]
    if (top, left) != (bottom, right):
        x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
    return F.conv2d(x, weight, conv.bias, conv.stride, (top, left), 1, conv.groups)


class CroppedConv2d(nn.Conv2d):
    """A Conv2d with zero padding and no dilation, which convolves an input smaller than its
    kernel's reach with the taps that meet it. Parameters and state dict are Conv2d's."""

    def forward(self, x: Tensor) -> Tensor:
        (ph, pw) = self.padding
        out = cropped_conv2d(self, x, (pw, pw, ph, ph))
        return super().forward(x) if out is None else out


class CroppedConv2dSame(Conv2dSame):
    """timm's Conv2dSame (TensorFlow's 'SAME' padding, uneven where the stride asks for it) with the
    same cropping."""

    def forward(self, x: Tensor) -> Tensor:
        out = cropped_conv2d(self, x, tuple(pad_same_arg(x.shape[-2:], self.kernel_size, self.stride, self.dilation)))
        return super().forward(x) if out is None else out


def croppable(module: nn.Module) -> type[nn.Conv2d] | None:
    """The cropping class of ``module``, when it is exactly a Conv2d (zero padding given as numbers)
    or timm's Conv2dSame, with a kernel wider than 1 and no dilation; else None."""
    if type(module) not in (nn.Conv2d, Conv2dSame) or module.dilation != (1, 1) or module.kernel_size == (1, 1):
        return None
    if type(module) is Conv2dSame:
        return CroppedConv2dSame
    plain_padding = module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return CroppedConv2d if plain_padding else None


def crop_kernels(model: nn.Module) -> nn.Module:
    """``model`` with its croppable convolutions cropping, in place (same parameters, same keys)."""
    for module in model.modules():
        cropping = croppable(module)
        if cropping is not None:
            module.__class__ = cropping
    return model

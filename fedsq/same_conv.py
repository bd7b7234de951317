"""'Same' convolutions on feature maps smaller than their kernel: only the taps that meet the input.

At 32 px, EfficientNet-Lite0's last stages run 5x5 and 3x3 depthwise kernels on 2x2 and 1x1
feature maps (ResNet-18's last 3x3 convolutions on 1x1), so most taps only ever multiply the zero
padding. oneDNN's backward pass on CPU spends as long on them as on real work: 18 ms a call for
a 5x5 depthwise convolution of 1152 channels at 1x1, about 0.9 MFLOP (a third of the training
step). Cropping the kernel to the taps that meet the input gives the same sums (the dropped terms
are products with zero) and the same gradients (the dropped taps' are zero), about 1.6x faster
(benchmarks/bench_round_cost.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SameConv2d(nn.Conv2d):
    """A stride-1 Conv2d with odd kernels and 'same' zero padding, which convolves an input smaller
    than its kernel's reach with the central taps only. Parameters and state dict are Conv2d's."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        reach = tuple(min(pad, size - 1) for pad, size in zip(self.padding, x.shape[-2:]))
        if reach == self.padding:
            return super()._conv_forward(x, weight, bias)
        (ph, pw), (rh, rw) = self.padding, reach
        return F.conv2d(x, weight[:, :, ph - rh:ph + rh + 1, pw - rw:pw + rw + 1], bias, 1, reach, 1, self.groups)


def is_same_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a plain Conv2d that SameConv2d computes: stride 1, no dilation, odd
    kernels, zero padding of half the kernel."""
    return (type(module) is nn.Conv2d and module.stride == (1, 1) and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and all(2 * pad + 1 == k for pad, k in zip(module.padding, module.kernel_size)))


def crop_same_convs(model: nn.Module) -> nn.Module:
    """``model`` with its 'same' convolutions made SameConv2d, in place (same parameters, same keys)."""
    for module in model.modules():
        if is_same_conv(module):
            module.__class__ = SameConv2d
    return model

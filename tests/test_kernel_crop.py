"""fedsq.kernel_crop: on feature maps smaller than its kernel's reach a cropping convolution computes
what the convolution it replaces computes, forward and backward, and only zero-padded convolutions
without dilation crop."""

import copy

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from fedsq import models
from fedsq.kernel_crop import CroppedConv2d, CroppedConv2dSame, crop_kernels


def assert_same_outputs_and_gradients(conv: nn.Conv2d, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    cropping = crop_kernels(copy.deepcopy(conv))
    assert type(cropping) is {nn.Conv2d: CroppedConv2d, Conv2dSame: CroppedConv2dSame}[type(conv)]
    x = torch.randn(4, conv.in_channels, *size, requires_grad=True)
    x_cropped = x.detach().clone().requires_grad_()
    try:
        out = conv(x)
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            cropping(x_cropped)  # as the convolution does
        assert "Kernel size can't be greater" in str(error)
        return
    out_cropped = cropping(x_cropped)
    torch.testing.assert_close(out_cropped, out)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_cropped.backward(grad)
    torch.testing.assert_close(x_cropped.grad, x.grad)
    torch.testing.assert_close(cropping.weight.grad, conv.weight.grad)  # the dropped taps' grads are zero
    torch.testing.assert_close(cropping.bias.grad, conv.bias.grad)


SIZES = [(1, 1), (2, 2), (1, 4), (3, 5), (8, 8)]


@pytest.mark.parametrize("groups", [1, 6])  # dense, depthwise
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel, stride, padding", [
    ((5, 5), 1, (2, 2)),  # 'same'
    ((3, 5), 1, (1, 2)),
    ((3, 3), 2, (1, 1)),  # ResNet's downsampling
    ((5, 3), (2, 1), (1, 0)),  # less padding than the kernel's reach
    ((3, 3), 1, (3, 3)),  # more: outputs that see padding only
])
def test_cropped_conv2d_gives_conv2d_outputs_and_gradients(groups, size, kernel, stride, padding):
    assert_same_outputs_and_gradients(nn.Conv2d(6, 6, kernel, stride, padding, groups=groups), size)


@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel, stride", [((5, 5), 2), ((3, 3), 2), ((3, 5), 1)])
def test_cropped_conv2d_same_gives_timm_outputs_and_gradients(groups, size, kernel, stride):
    assert_same_outputs_and_gradients(Conv2dSame(6, 6, kernel, stride, groups=groups), size)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    nn.Conv2d(4, 4, 1),  # nothing to crop
    nn.Conv2d(4, 4, 3, padding="same"),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    nn.ConvTranspose2d(4, 4, 3, padding=1),
], ids=["dilation", "1x1", "same-string", "reflect", "transposed"])
def test_other_convolutions_stay_as_they_are(conv):
    kind = type(conv)
    assert type(crop_kernels(conv)) is kind


def test_efficientnet_lite0_crops_both_kinds_and_keeps_its_state_dict_keys():
    model = models.build("efficientnet_lite0", 10, None)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)}
    assert kinds == {CroppedConv2d, CroppedConv2dSame}
    plain = models.backbone("efficientnet_lite0").architecture()
    models.backbone("efficientnet_lite0").replace_head(plain, 10)
    assert list(model.state_dict()) == list(plain.state_dict())

"""SameConv2d (fedsq.same_conv): on feature maps smaller than its kernel's reach it computes what
Conv2d computes, forward and backward, and only plain stride-1 'same' convolutions become one."""

import copy

import pytest
import torch
from torch import nn

from fedsq import models
from fedsq.same_conv import SameConv2d, crop_same_convs


@pytest.mark.parametrize("groups", [1, 6])  # dense, depthwise
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (1, 4), (3, 5), (8, 8)])
@pytest.mark.parametrize("kernel", [(5, 5), (3, 5)])
def test_cropped_kernel_gives_conv2d_outputs_and_gradients(groups, size, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=groups)
    same = crop_same_convs(copy.deepcopy(conv))
    assert type(same) is SameConv2d
    x = torch.randn(4, 6, *size, requires_grad=True)
    x_same = x.detach().clone().requires_grad_()
    out, out_same = conv(x), same(x_same)
    torch.testing.assert_close(out_same, out)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_same.backward(grad)
    torch.testing.assert_close(x_same.grad, x.grad)
    torch.testing.assert_close(same.weight.grad, conv.weight.grad)  # the dropped taps' grads are zero
    torch.testing.assert_close(same.bias.grad, conv.bias.grad)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, stride=2, padding=1),
    nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    nn.Conv2d(4, 4, 4, padding=2),  # even kernel: padding is not half of it
    nn.Conv2d(4, 4, 3, padding=0),
    nn.Conv2d(4, 4, 3, padding="same"),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
], ids=["stride", "dilation", "even", "valid", "same-string", "reflect"])
def test_other_convolutions_stay_conv2d(conv):
    assert type(crop_same_convs(conv)) is nn.Conv2d


def test_built_backbones_crop_their_same_convs_and_keep_their_state_dict_keys():
    model = models.build("efficientnet_lite0", 10, None)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert "SameConv2d" in kinds and "Conv2dSame" in kinds  # timm's stride-2 padding convolutions stay
    plain = models.backbone("efficientnet_lite0").architecture()
    models.backbone("efficientnet_lite0").replace_head(plain, 10)
    assert list(model.state_dict()) == list(plain.state_dict())

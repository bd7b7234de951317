"""Backbones: ImageNet-1K architectures with their head sized for the task.

Each backbone has a spec (smallest input it accepts, the normalisation its pretrained
weights were trained with, the non-linearity that DualCopy gates) and a builder that
loads a weights file (or keeps the random init: ``scratch``) and replaces the classifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from torch import nn

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    min_image_size: int  # smaller inputs are rejected (images are resized to the run's image_size)
    mean: tuple[float, float, float]  # input normalisation the pretrained weights expect
    std: tuple[float, float, float]
    gate: str  # the piecewise-linear non-linearity: "relu" | "relu6"


SPECS = {
    # AlexNet's feature stack (stride 4 conv, three 3x3/2 max-pools) needs 63 px to leave 1 px.
    "alexnet": BackboneSpec("alexnet", 63, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "relu"),
    # Total stride 32: below 32 px the last stage sees less than one pixel of the input grid.
    "resnet18": BackboneSpec("resnet18", 32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "relu"),
    # The weights are a TensorFlow conversion: TF-Lite preprocessing maps pixels to [-1, 1].
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", 32, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, "relu6"
    ),
}


def spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise ValueError(f"backbone={name!r} is unknown; allowed: {', '.join(SPECS)}")
    return SPECS[name]


def check_image_size(name: str, image_size: int) -> None:
    smallest = spec(name).min_image_size
    if image_size < smallest:
        raise ValueError(f"image_size={image_size} is too small for backbone {name!r}; it needs at least {smallest}")


def _efficientnet_lite0() -> nn.Module:
    # timm's "tf_" variant: TensorFlow "same" padding and BatchNorm eps 1e-3, as in the TF
    # checkpoint the pip weights were converted from.
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


_ARCHITECTURES = {
    "alexnet": torchvision.models.alexnet,
    "resnet18": torchvision.models.resnet18,
    "efficientnet_lite0": _efficientnet_lite0,
}

# efficientnet_pytorch naming (the pip package's file) -> timm naming.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # efficientnet_pytorch numbers blocks 0..15 across stages


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-Lite0 state dict from efficientnet_pytorch keys to timm's."""
    block_position = [(s, i) for s, depth in enumerate(_EFFNET_LITE0_STAGE_DEPTHS) for i in range(depth)]
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            number, layer, param = int(match[1]), match[2], match[3]
            stage, index = block_position[number]
            layer = (_EFFNET_FIRST_BLOCK if number == 0 else _EFFNET_BLOCK)[layer]
            renamed[f"blocks.{stage}.{index}.{layer}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            renamed[f"{_EFFNET_TOP[module]}.{param}"] = value
    return renamed


def load_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file as a state dict in the architecture's own naming."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name == "efficientnet_lite0" and "_conv_stem.weight" in state:
        state = efficientnet_pytorch_to_timm(state)
    return state


def _replace_head(name: str, model: nn.Module, num_classes: int) -> None:
    if name == "alexnet":
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    elif name == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model.reset_classifier(num_classes)


def build(name: str, num_classes: int, weights: Path | None) -> nn.Module:
    """A backbone with a ``num_classes`` head; ``weights`` None means scratch (random init).

    The ImageNet head is kept when ``num_classes`` is 1000, so the pretrained classifier
    can be checked on natural photos.
    """
    spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    model = _ARCHITECTURES[name]()
    if weights is not None:
        model.load_state_dict(load_weights(name, Path(weights)))
    if num_classes != IMAGENET_CLASSES:
        _replace_head(name, model, num_classes)
    return model

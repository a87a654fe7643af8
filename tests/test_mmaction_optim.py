"""The optimizer constructor on LayerNorm/layer-scale backbones, and the clip length from the pipeline."""

import os

import pytest
import torch

pytest.importorskip("mmaction")
pytest.importorskip("timm")

from mmaction.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import tsm_surgery.integrations.mmaction  # noqa: F401
from tsm_surgery.integrations.mmaction import sync_clip_length

init_default_scope("mmaction")

OPTIM = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4))


@pytest.fixture(scope="module")
def convnext():
    # ConvNeXt: LayerNorm, depthwise convs and per-channel layer scales (gamma) in every block.
    return MODELS.build(dict(
        type="Recognizer2D",
        backbone=dict(type="TSMSurgeryBackbone", num_segments=2, example_input_size=64,
                      backbone=dict(type="timm.convnext_atto", pretrained=False)),
        cls_head=dict(type="TSMHead", num_classes=5, in_channels=320, num_segments=2)))


def test_stock_constructor_raises_on_layernorm(convnext):
    stock = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(type="TSMOptimWrapperConstructor", optim_wrapper_cfg=OPTIM,
                                                  paramwise_cfg=dict(fc_lr5=True)))
    with pytest.raises(ValueError, match="New atomic module type"):
        stock(convnext)


def test_surgery_constructor_groups_every_parameter_once(convnext):
    ours = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(type="TSMSurgeryOptimWrapperConstructor", optim_wrapper_cfg=OPTIM,
                                                 paramwise_cfg=dict(fc_lr5=True)))
    wrapper = ours(convnext)
    groups = wrapper.optimizer.param_groups
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in convnext.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))

    def group_of(param):
        return next(g for g in groups if any(p is param for p in g["params"]))

    fc = convnext.cls_head.fc_cls
    assert group_of(fc.weight)["lr"] == pytest.approx(0.05) and group_of(fc.weight)["weight_decay"] == 1e-4
    assert group_of(fc.bias)["lr"] == pytest.approx(0.1) and group_of(fc.bias)["weight_decay"] == 0
    backbone = convnext.backbone
    norm = next(m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm))
    assert group_of(norm.weight)["weight_decay"] == 0 and group_of(norm.weight)["lr"] == pytest.approx(0.01)
    gamma = next(p for n, p in backbone.named_parameters() if n.endswith("gamma"))
    assert group_of(gamma)["weight_decay"] == 0
    conv = backbone.stages[1].blocks[0].conv_dw
    assert group_of(conv.weight)["weight_decay"] == 1e-4 and group_of(conv.bias)["lr"] == pytest.approx(0.02)
    # A step runs with these groups.
    x = torch.randn(1, 2, 3, 64, 64)
    feats, _ = convnext.extract_feat(x, stage="head")
    feats.sum().backward()
    wrapper.step()


def test_sync_clip_length_from_pipeline():
    """Change num_clips in the pipeline only: backbone and head follow."""
    cfg = Config.fromfile(os.path.join(os.path.dirname(__file__), "..", "configs",
                                       "tsm_surgery_r50_1x1x8_50e_kinetics400.py"))
    assert cfg.model.backbone.num_segments == 8
    cfg.merge_from_dict({"train_dataloader.dataset.pipeline.1.num_clips": 16})
    assert sync_clip_length(cfg) == 16
    assert cfg.model.backbone.num_segments == 16 and cfg.model.cls_head.num_segments == 16
    assert sync_clip_length(cfg, split="test") == 8  # the stock test pipeline still samples 8

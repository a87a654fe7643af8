"""Every config in configs/ (including configs/demo/) loads and builds its model."""

import copy
import glob
import os

import pytest
import torch

pytest.importorskip("mmaction")
pytest.importorskip("mmengine")

from mmengine.config import Config

import tsm_surgery.integrations.mmaction  # noqa: F401  (compat + registration)
from tsm_surgery.integrations.mmaction.clip_length import frames_per_clip, sync_clip_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files starting with "_" are base fragments other configs inherit, not configs of their own.
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 if not os.path.basename(p).startswith("_"))


def _offline(node):
    """No network in tests: timm builds without downloading, MMAction2 weights load only in init_weights."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str) and node["type"].startswith("timm.") and node.get("pretrained"):
            node["pretrained"] = False
        for value in node.values():
            _offline(value)
    elif isinstance(node, list):
        for value in node:
            _offline(value)


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tsm_surgery_r50_1x1x8_50e_kinetics400.py", "tsm_surgery_timm-r50_1x1x8_50e_kinetics400.py",
            "tsm_surgery_timm-mobilenetv2-uni_1x1x8_100e_kinetics400.py",
            "tsm_surgery_r50_1x1x8_50e_sthv2.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_builds(path):
    from mmaction.registry import MODELS
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(path)
    init_default_scope(cfg.get("default_scope", "mmaction"))
    frames = sync_clip_length(cfg)
    _offline(cfg.model)
    model = MODELS.build(copy.deepcopy(cfg.model))  # Recognizer2D pops keys from timm backbone dicts
    model.eval()
    backbone = model.backbone
    if cfg.model.backbone.type == "TSMSurgeryBackbone":
        assert backbone.num_segments == frames == frames_per_clip(cfg.train_dataloader.dataset.pipeline)
        assert len(backbone.sites) > 0
    if hasattr(model.cls_head, "num_segments") and frames:
        assert model.cls_head.num_segments == frames
    # One clip through the whole recognizer at a small size: the head accepts the features.
    t = frames or 1
    inputs = torch.randn(1, t, 3, 64, 64)
    with torch.no_grad():
        feats, _ = model.extract_feat(inputs, stage="head")
    num_classes = cfg.model.cls_head.num_classes
    assert feats.shape == (1, num_classes)
    assert torch.isfinite(feats).all()

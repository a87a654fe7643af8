"""Every stock MMAction2 1.2.0 TSM/TPN-TSM config with its backbone type swapped equals the stock
model; every stock TSN config with its backbone wrapped in TSMSurgeryBackbone trains.

The configs are the installed mmaction2's own files, so a config missing from the install is a
failure (the counts below), not a silently shorter list.
"""

import copy
import glob
import os
import re

import pytest
import torch

pytest.importorskip("mmaction")

import mmaction  # noqa: E402
import tsm_surgery.integrations.mmaction  # noqa: E402,F401
from mmaction.registry import MODELS  # noqa: E402
from mmaction.structures import ActionDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from tsm_surgery.integrations.mmaction import STOCK_EQUIVALENTS  # noqa: E402
from utils import randomize_norms  # noqa: E402

init_default_scope("mmaction")

CONFIGS = os.path.join(os.path.dirname(mmaction.__file__), ".mim", "configs", "recognition")
TSM_CONFIGS = sorted(glob.glob(f"{CONFIGS}/tsm/*.py")) + sorted(glob.glob(f"{CONFIGS}/tpn/tpn-tsm_*.py"))
TSN_CONFIGS = sorted(glob.glob(f"{CONFIGS}/tsn/*.py")) + sorted(glob.glob(f"{CONFIGS}/tsn/custom_backbones/*.py"))
# Big networks whose step takes tens of seconds on two shared cores; each family keeps a fast case.
SLOW_TSN = ("r101_8xb32", "swin-transformer", "dense161", "mobileone-s4_deploy", "rn101-32x4d")
SLOW_TSM = ("r101_8xb16",)

PLUGIN = "custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)\n"


def _ids(paths):
    return [os.path.basename(p)[:-3] for p in paths]


def _marked(paths, slow):
    return [pytest.param(p, marks=pytest.mark.slow) if any(s in p for s in slow) else p for p in paths]


def test_the_installed_mmaction2_ships_every_stock_config():
    assert len(TSM_CONFIGS) == 14, _ids(TSM_CONFIGS)
    assert len(TSN_CONFIGS) == 14, _ids(TSN_CONFIGS)
    stock_types = {Config.fromfile(p).model.backbone.type for p in TSM_CONFIGS}
    assert stock_types == set(STOCK_EQUIVALENTS) == {"ResNetTSM", "MobileNetV2TSM", "MobileOneTSM"}


def _user_config(tmp_path, stock_path: str) -> Config:
    """What a user writes: inherit the stock config, import the plugin, swap the backbone type."""
    stock_type = Config.fromfile(stock_path).model.backbone.type
    path = tmp_path / "swapped.py"
    path.write_text(f"_base_ = [{stock_path!r}]\n{PLUGIN}"
                    f"model = dict(backbone=dict(type={STOCK_EQUIVALENTS[stock_type]!r}))\n")
    return Config.fromfile(str(path))


def to_plain_keys(key: str) -> str:
    """A stock key as the surgery type names it: the TemporalShift ``.net`` and NL3DWrapper ``.block`` go."""
    return re.sub(r"\.(net|block)(?=\.)", "", key)


def _random_weights(model: torch.nn.Module) -> None:
    randomize_norms(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "non_local_block" in name and param.dim() > 1:
                param.normal_(0, 0.05)  # mmcv zero-initialises conv_out: the block would be the identity


def _clip_input(cfg: Config, frames: int, size: int = 32) -> torch.Tensor:
    channels = cfg.model.backbone.get("in_channels", 3)
    return torch.randn(1, frames, channels, size, size)


@pytest.mark.parametrize("stock_path", _marked(TSM_CONFIGS, SLOW_TSM), ids=_ids(TSM_CONFIGS))
def test_swapped_stock_tsm_config_equals_stock(tmp_path, stock_path):
    stock_cfg, user_cfg = Config.fromfile(stock_path), _user_config(tmp_path, stock_path)
    stock, ours = MODELS.build(stock_cfg.model), MODELS.build(user_cfg.model)
    _random_weights(stock)
    state = {to_plain_keys(k): v for k, v in stock.state_dict().items()}
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state, strict=True)
    # The same rules: as many shifts and non-local blocks as the stock model has.
    stock_shifts = [m for m in stock.backbone.modules() if type(m).__name__ == "TemporalShift"]
    threshold = stock_cfg.model.backbone.get("shift_div", 8)
    shifting = [m for m in stock_shifts if _first_channels(m.net) >= threshold]
    assert len(ours.backbone.sites) == len(shifting)
    frames = stock.backbone.num_segments
    x = _clip_input(stock_cfg, frames)
    worst = 0.0
    for mode in ("train", "eval"):
        stock.train(mode == "train"), ours.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(1)
            expected = stock(x, mode="tensor")
            torch.manual_seed(1)
            got = ours(x, mode="tensor")
            feats = stock.backbone(x.flatten(0, 1)), ours.backbone(x.flatten(0, 1))
        pairs = list(zip(_tensors((expected, feats[0])), _tensors((got, feats[1]))))
        assert pairs
        for want, have in pairs:
            assert have.shape == want.shape
            diff = (have - want).abs().max().item()
            assert diff <= 1e-5 * max(1.0, want.abs().max().item()), (mode, diff)
            worst = max(worst, diff)
    print(f"{os.path.basename(stock_path)}: max abs diff {worst:.3g}")


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _tensors(item)] if isinstance(value, (tuple, list)) else []


def _first_channels(module: torch.nn.Module) -> int:
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return conv.in_channels


def _wrapped_tsn(stock_path: str, frames: int) -> dict:
    """The stock TSN model config with its backbone entry wrapped; nothing else changed but downloads."""
    model = copy.deepcopy(Config.fromfile(stock_path).model)
    inner = dict(model.backbone)
    if inner["type"].startswith(("timm.", "torchvision.")):
        inner["pretrained"] = False  # no downloads in tests; the architecture is the stock one
    wrapper = dict(type="TSMSurgeryBackbone", backbone=inner, num_segments=frames)
    if inner["type"] == "torchvision.densenet161":
        wrapper["no_residual"] = "first_conv"  # DenseNet has no residual join: the documented policy
    model.backbone = wrapper
    return model.to_dict() if hasattr(model, "to_dict") else dict(model)


def _tsn_size(stock_path: str) -> int:
    return 224 if "swin" in stock_path else 64  # timm's Swin takes the size it was built for


@pytest.mark.parametrize("stock_path", _marked(TSN_CONFIGS, SLOW_TSN), ids=_ids(TSN_CONFIGS))
def test_wrapped_stock_tsn_config_trains(stock_path):
    frames = 2
    model = MODELS.build(_wrapped_tsn(stock_path, frames))
    assert type(model.backbone).__name__ == "TSMSurgeryBackbone" and len(model.backbone.sites) > 0
    channels = _first_channels(model.backbone.model2d)
    size = _tsn_size(stock_path)
    data = dict(inputs=[torch.randint(0, 255, (frames, channels, size, size), dtype=torch.uint8)],
                data_samples=[ActionDataSample().set_gt_label(1)])
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if v.is_floating_point()}
    model.train()
    losses = model.train_step(data, optim)
    loss = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(loss)
    changed = [k for k, v in model.backbone.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "the training step changed no backbone weight"
    # The head saw the features the unwrapped backbone gives: one C-vector per frame.
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(model.data_preprocessor(data)["inputs"])[0]
    assert feats.shape[:2] == (frames, model.cls_head.in_channels)

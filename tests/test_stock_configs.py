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

import mmaction
from mmaction.registry import MODELS
from mmaction.structures import ActionDataSample
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import init_default_scope
from utils import randomize_norms

import tsm_surgery
import tsm_surgery.integrations.mmaction
from tsm_surgery.integrations.mmaction import STOCK_EQUIVALENTS

init_default_scope("mmaction")

CONFIGS = os.path.join(os.path.dirname(mmaction.__file__), ".mim", "configs", "recognition")
TSM_CONFIGS = sorted(glob.glob(f"{CONFIGS}/tsm/*.py")) + sorted(glob.glob(f"{CONFIGS}/tpn/tpn-tsm_*.py"))
TSN_CONFIGS = sorted(glob.glob(f"{CONFIGS}/tsn/*.py")) + sorted(glob.glob(f"{CONFIGS}/tsn/custom_backbones/*.py"))
# Big networks whose step takes tens of seconds on two shared cores; each family keeps a fast case.
SLOW_TSN = ("r101_8xb32", "swin-transformer", "dense161")
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


def _clip_input(cfg: Config) -> torch.Tensor:
    """Two clips of the frames the config's head takes (the stock MobileOne 1x1x16 configs give the head
    16 and leave the backbone at 8: it then shifts within groups of 8, and so must ours)."""
    frames = cfg.model.cls_head.get("num_segments") or cfg.model.backbone.get("num_segments", 8)
    channels = cfg.model.backbone.get("in_channels", 3)
    size = 64 if cfg.model.get("neck") else 32  # TPN's neck normalises over space: not 1x1 maps
    return torch.randn(2, frames, channels, size, size)


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
    x = _clip_input(stock_cfg)
    worst = 0.0
    for mode in ("train", "eval"):
        stock.train(mode == "train"), ours.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(1)  # the same dropout masks in the heads
            expected = stock.extract_feat(x, stage="head")[0]
            torch.manual_seed(1)
            got = ours.extract_feat(x, stage="head")[0]
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
        wrapper["no_residual"] = "block_entry"  # DenseNet has no residual join: the documented policy
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


# --- The surgery types' arguments, beyond what the stock configs set ---------------------------

def _stock_pair(stock_type: str, frames: int = 4, **kwargs):
    """The stock backbone with random weights and the surgery type loaded with them."""
    from mmaction.models.backbones import ResNetTSM

    assert stock_type == "ResNetTSM"
    stock = ResNetTSM(num_segments=frames, pretrained2d=False, **kwargs)
    _random_weights(stock)
    ours = MODELS.build(dict(type=STOCK_EQUIVALENTS[stock_type], num_segments=frames, **kwargs))
    ours.load_state_dict({to_plain_keys(k): v for k, v in stock.state_dict().items()}, strict=True)
    return stock, ours


def _assert_equal_outputs(stock, ours, x):
    for mode in (True, False):
        stock.train(mode), ours.train(mode)
        with torch.no_grad():
            want, have = _tensors(stock(x)), _tensors(ours(x))
        assert len(want) == len(have) > 0
        for w, h in zip(want, have):
            assert h.shape == w.shape
            assert (h - w).abs().max().item() <= 1e-5 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("kwargs", [
    dict(depth=18, shift_place="block"),
    dict(depth=18, shift_div=4, out_indices=(0, 1, 2, 3)),
    dict(depth=18, norm_eval=True, frozen_stages=2, partial_bn=True),
    dict(depth=18, temporal_pool=True, out_indices=(2, 3)),
    pytest.param(dict(depth=50, non_local=((1, 0, 0), (0, 1, 0, 0), (0,) * 6, (0, 0, 0)),  # needs bottlenecks
                      non_local_cfg=dict(mode="embedded_gaussian", sub_sample=True)), marks=pytest.mark.slow),
], ids=["block", "shift_div4-all-stages", "norm_eval-frozen-partial_bn", "temporal_pool", "non_local"])
def test_resnet_kwargs_equal_resnettsm(kwargs):
    stock, ours = _stock_pair("ResNetTSM", **kwargs)
    _assert_equal_outputs(stock, ours, torch.randn(8, 3, 64, 64))
    frozen = kwargs.get("frozen_stages", -1)
    if frozen >= 0:
        ours.train()
        assert not any(p.requires_grad for p in ours.model2d.layer1.parameters())
        assert not ours.model2d.layer1[0].conv1.bn.training  # norm_eval


def test_temporal_pool_halves_later_shifts_and_follows_num_segments():
    _, ours = _stock_pair("ResNetTSM", frames=8, depth=18, temporal_pool=True)
    settings = {name: m.n_segments for name, m in ours.net.shift_modules().items()}
    assert {n: t for n, t in settings.items() if n.startswith("layer1")} == {"layer1.0": 8, "layer1.1": 8}
    assert set(t for n, t in settings.items() if not n.startswith("layer1")) == {4}
    ours.num_segments = 4  # what ClipLengthHook does for a 4-frame pipeline
    fresh = MODELS.build(dict(type="TSMSurgeryResNet", depth=18, num_segments=4, temporal_pool=True))
    fresh.load_state_dict(ours.state_dict())
    ours.eval(), fresh.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), fresh(x))
    assert ours(x).shape[0] == 4  # two clips of 4 frames pooled to 2 each


def test_resnet101_shifts_every_other_block_by_rule():
    ours = MODELS.build(dict(type="TSMSurgeryResNet", depth=101, num_segments=4))
    names = [s.name for s in ours.sites]
    assert len(names) == 18  # not 33: the 23-block layer3 makes every stage shift blocks 0, 2, ...
    assert all(int(n.rsplit(".", 1)[1]) % 2 == 0 for n in names)
    assert sum(n.startswith("layer3.") for n in names) == 12
    block = MODELS.build(dict(type="TSMSurgeryResNet", depth=101, num_segments=4, shift_place="block"))
    assert len(block.sites) == 33  # ResNetTSM's 'block' placement shifts every block


@pytest.mark.parametrize("type_, kwargs, error, words", [
    ("TSMSurgeryResNet", dict(depth=18, bogus=1), TypeError, "bogus"),
    ("TSMSurgeryResNet", dict(depth=18, with_cp=True), ValueError, "with_cp"),
    ("TSMSurgeryResNet", dict(depth=18, is_shift=False), ValueError, "TSN"),
    ("TSMSurgeryResNet", dict(depth=18, shift_place="residual2"), ValueError, "blockres"),
    ("TSMSurgeryResNet", dict(depth=18, non_local=((1, 0), 0, 0, 0)), ValueError, "non_local_cfg"),
    ("TSMSurgeryResNet", dict(depth=18, non_local=((1, 0, 0), 0, 0, 0), non_local_cfg=dict(mode="dot_product")),
     ValueError, "2 blocks"),
    ("TSMSurgeryResNet", dict(depth=18, temporal_pool=True, num_segments=5), ValueError, "even"),
    ("TSMSurgeryResNet", dict(depth=18, temporal_pool=True, non_local=((1, 0), 0, 0, 0),
                              non_local_cfg=dict(mode="dot_product")), ValueError, "mixing clips"),
    ("TSMSurgeryMobileNetV2", dict(shift_place="block"), TypeError, "shift_place"),
    ("TSMSurgeryMobileNetV2", dict(with_cp=True), ValueError, "with_cp"),
    ("TSMSurgeryMobileOne", dict(arch="s0", depth=50), TypeError, "depth"),
])
def test_unsupported_stock_kwargs_are_refused(type_, kwargs, error, words):
    with pytest.raises(error, match=words):
        MODELS.build(dict(type=type_, **kwargs))


# --- pretrained names, resolved as MMAction2 does, read weights-only, never downloaded here ------

def test_torchvision_name_resolves_to_the_hub_cache_and_loads(tmp_path, monkeypatch):
    import torchvision
    from mmengine.runner.checkpoint import get_torchvision_models

    from tsm_surgery.integrations.mmaction.stock import resolve_pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = get_torchvision_models()["resnet18"]
    path = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    reference = randomize_norms(torchvision.models.resnet18())
    torch.save(reference.state_dict(), path)  # what MMAction2 would have downloaded there
    assert resolve_pretrained("torchvision://resnet18") == (str(path), None)
    ours = MODELS.build(dict(type="TSMSurgeryResNet", depth=18, num_segments=4, pretrained="torchvision://resnet18"))
    ours.init_weights()
    assert torch.equal(ours.state_dict()["layer2.0.conv1.conv.weight"], reference.layer2[0].conv1.weight)
    want = reference.layer2[0].downsample[1].running_var
    assert torch.equal(ours.state_dict()["layer2.0.downsample.bn.running_var"], want)


def test_mmcls_name_resolves_and_loads_strictly(tmp_path, monkeypatch):
    from mmaction.models.backbones import MobileNetV2
    from mmengine.runner.checkpoint import get_mmcls_models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / os.path.basename(get_mmcls_models()["mobilenet_v2"])
    path.parent.mkdir(parents=True)
    reference = randomize_norms(MobileNetV2())
    # an mmcls classifier checkpoint: backbone weights under 'backbone.', a head beside them
    state = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": {**state, "head.fc.weight": torch.zeros(2, 2)}}, path)
    ours = MODELS.build(dict(type="TSMSurgeryMobileNetV2", num_segments=4, pretrained="mmcls://mobilenet_v2"))
    ours.init_weights()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    torch.save({"state_dict": {k: v for k, v in state.items() if "conv2" not in k}}, path)
    again = MODELS.build(dict(type="TSMSurgeryMobileNetV2", num_segments=4, pretrained="mmcls://mobilenet_v2"))
    with pytest.raises(KeyError, match="missing"):
        again.init_weights()


def test_mobileone_init_cfg_pretrained_loads_with_prefix(tmp_path):
    from mmpretrain.models import MobileOne

    reference = randomize_norms(MobileOne("s0"))
    path = tmp_path / "mobileone.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in reference.state_dict().items()}}, path)
    ours = MODELS.build(dict(type="TSMSurgeryMobileOne", arch="s0", num_segments=4,
                             init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone")))
    ours.init_weights()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("type_, kwargs", [("TSMSurgeryMobileNetV2", {}), ("TSMSurgeryMobileOne", {"arch": "s0"})])
def test_direction_and_uni_slot_reach_every_shift(type_, kwargs):
    ours = MODELS.build(dict(type=type_, num_segments=2, direction="uni", uni_slot="first", **kwargs))
    shifts = list(ours.net.shift_modules().values())
    assert shifts and all((s.direction, s.uni_slot) == ("uni", "first") for s in shifts)


def test_docstring_examples_of_the_stock_module():
    import doctest

    from tsm_surgery.integrations.mmaction import _temporal, stock

    for module in (stock, _temporal):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_wrapped_tsn_url_checkpoint_is_read_from_the_cache_weights_only(tmp_path, monkeypatch):
    """The stock TSN-R50 config names an https:// checkpoint: read from torch hub's cache, never unpickled in full."""
    import torchvision

    from tsm_surgery.integrations.checkpoints.loading import CheckpointLoadError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    stock = [p for p in TSN_CONFIGS if p.endswith("tsn_imagenet-pretrained-r50_8xb32-1x1x8-100e_kinetics400-rgb.py")]
    cfg = _wrapped_tsn(stock[0], frames=2)
    url = cfg["backbone"]["backbone"]["pretrained"]
    assert url.startswith("https://")
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    reference = randomize_norms(torchvision.models.resnet50())
    torch.save(reference.state_dict(), cached)  # torchvision's layout, which MMAction2's ResNet maps
    model = MODELS.build(cfg)
    model.init_weights()
    assert torch.equal(model.backbone.state_dict()["conv1.bn.running_var"], reference.bn1.running_var)
    assert torch.equal(model.backbone.state_dict()["layer2.0.conv1.conv.weight"], reference.layer2[0].conv1.weight)
    assert model.backbone.model2d.pretrained == url  # the config's value is kept
    torch.save({"conv1.weight": _Evil()}, cached)
    with pytest.raises(CheckpointLoadError, match="system"):
        MODELS.build(cfg).init_weights()


# --- TSN checkpoints load into the wrapped stock TSN configs unchanged -------------------------

# densenet161 takes minutes on two shared cores; densenet121 is the same torchvision class and layout
# (type, the head's input channels).
SMALL_TSN_VARIANTS = {"torchvision.densenet161": ("torchvision.densenet121", 1024)}


def _tsn_pair(stock_path: str, frames: int, small: bool):
    """The stock TSN recognizer and its wrapped form, the stock one with random weights."""
    model = _wrapped_tsn(stock_path, frames)
    inner = model["backbone"]["backbone"]
    if small:
        inner["type"], model["cls_head"]["in_channels"] = SMALL_TSN_VARIANTS[inner["type"]]
    stock_cfg = copy.deepcopy(model)
    # Recognizer2D builds mmcls.<type> with mmcls only; mmpretrain is mmcls renamed, as the plugin reads it.
    stock_cfg["backbone"] = dict(inner, type=re.sub(r"^mmcls\.", "mmpretrain.", inner["type"]))
    stock, ours = MODELS.build(stock_cfg), MODELS.build(model)
    _random_weights(stock)
    return stock, ours


def _switch_shifts_off(model: torch.nn.Module) -> int:
    shifts = [m for m in model.modules() if isinstance(m, tsm_surgery.TemporalShift)]
    for shift in shifts:
        shift.forward = lambda x, **kwargs: x  # swap=True asks for an in-place move: none here either
    return len(shifts)


TSN_KEY_CASES = [pytest.param(p, False, marks=pytest.mark.slow) if any(s in p for s in SLOW_TSN) else (p, False)
                 for p in TSN_CONFIGS]
TSN_KEY_CASES += [(p, True) for p in TSN_CONFIGS if "dense161" in p]


def _stock_scores(stock, x: torch.Tensor) -> torch.Tensor:
    """The stock TSN recognizer's class scores for ``x``.

    timm's Swin returns NHWC feature maps (it says so in ``output_fmt``); the stock configs set no
    ``feature_shape``, so Recognizer2D takes any 4-D map for NCHW and pools the wrong axes. The
    reference uses Recognizer2D's own NHWC path, which the wrapped backbone matches.
    """
    if getattr(stock.backbone, "output_fmt", "NCHW") == "NHWC":
        stock.feature_shape = "NHWC"
    return stock.extract_feat(x, stage="head")[0]


@pytest.mark.parametrize(("stock_path", "small"), TSN_KEY_CASES,
                         ids=_ids(TSN_CONFIGS) + [f"{i}-small" for i in _ids(TSN_CONFIGS) if "dense161" in i])
def test_wrapped_stock_tsn_config_has_the_tsn_keys_and_outputs(stock_path, small):
    """A TSN checkpoint of the stock config loads unchanged into the wrapped config, and with the
    shifts switched off the wrapped recognizer computes the TSN recognizer's numbers."""
    frames = 2
    stock, ours = _tsn_pair(stock_path, frames, small)
    stock_state = stock.state_dict()
    assert set(ours.state_dict()) == set(stock_state)
    ours.load_state_dict(stock_state, strict=True)
    assert _switch_shifts_off(ours) > 0
    stock.eval(), ours.eval()
    channels = _first_channels(stock.backbone)
    size = _tsn_size(stock_path)
    x = torch.randn(1, frames, channels, size, size)
    with torch.no_grad():
        want, have = _stock_scores(stock, x), ours.extract_feat(x, stage="head")[0]
    assert have.shape == want.shape
    assert (have - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())

"""TSMSurgeryBackbone against MMAction2's ResNetTSM, timm and torchvision models; init and errors."""

import copy

import pytest
import torch

pytest.importorskip("mmaction")

from mmaction.models.backbones import ResNet, ResNetTSM
from mmaction.registry import MODELS
from mmengine.registry import init_default_scope
from utils import randomize_norms

import tsm_surgery
import tsm_surgery.integrations.mmaction
from tsm_surgery.integrations.mmaction import TSMSurgeryBackbone

init_default_scope("mmaction")


def _pair(depth, place="blockres", frames=4):
    ref = ResNetTSM(depth=depth, num_segments=frames, shift_div=8, shift_place=place, norm_eval=False,
                    pretrained2d=False)
    randomize_norms(ref)
    ours = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=frames, shift_div=8, shift_place=place,
                             backbone=dict(type="ResNet", depth=depth, norm_eval=False), example_input_size=64))
    # ResNetTSM wraps each shifted conv in a TemporalShift module: its keys carry an extra '.net'.
    state = {k.replace(".net.", "."): v for k, v in ref.state_dict().items()}
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state, strict=True)
    return ref, ours


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_equals_resnettsm_blockres(depth, mode):
    ref, ours = _pair(depth)
    getattr(ref, mode)()
    getattr(ours, mode)()
    x = torch.randn(2 * 4, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
        plain = ResNet(depth=depth, norm_eval=False)
        plain.load_state_dict(ours.state_dict())
        getattr(plain, mode)()
        flat = plain(x)
    assert got.shape == expected.shape == (8, 512 * (4 if depth == 50 else 1), 2, 2)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5 * expected.abs().max().item(), diff
    # The shift must matter, or the comparison tests nothing.
    assert (flat - expected).abs().max().item() > 1e-2 * expected.abs().max().item()


def test_equals_resnettsm_block_place():
    ref, ours = _pair(18, place="block")
    ref.eval(), ours.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_keys_are_the_2d_keys_and_no_parameters_added():
    backbone = dict(type="ResNet", depth=18)
    ours = MODELS.build(dict(type="TSMSurgeryBackbone", backbone=backbone, example_input_size=32))
    plain = MODELS.build(backbone)
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in plain.parameters())
    assert len(ours.sites) == 8 and ours.num_segments == 8


def test_timm_backbone_matches_convert_and_is_nchw():
    import timm

    kwargs = dict(pretrained=False, channels=(16, 32, 64, 128), stem_width=16)
    ours = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=4, direction="uni",
                             backbone=dict(type="timm.resnet18", **kwargs), example_input_size=64))
    model2d = randomize_norms(timm.create_model("resnet18", num_classes=0, global_pool="", **kwargs))
    ours.load_state_dict(model2d.state_dict(), strict=True)
    ref = tsm_surgery.convert(model2d, n_segments=4, direction="uni").eval()
    ours.eval()
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        got, expected, flat = ours(x), ref(x), model2d.eval()(x)
    assert got.shape == (8, 128, 2, 2)
    assert torch.equal(got, expected)
    assert (got - flat).abs().max() > 1e-3
    # uni: changing the last frame of a clip changes no earlier frame's features.
    x2 = x.clone()
    x2[3] = torch.randn(3, 64, 64)
    with torch.no_grad():
        got2 = ours(x2)
    assert torch.equal(got2[:3], got[:3]) and torch.equal(got2[4:], got[4:])
    assert not torch.equal(got2[3], got[3])


def test_torchvision_backbones():
    mobilenet = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=2,
                                  backbone=dict(type="torchvision.mobilenet_v2", weights=None), example_input_size=64))
    resnet = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=2,
                               backbone=dict(type="torchvision.resnet18", weights=None), example_input_size=64))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert mobilenet.eval()(x).shape == (4, 1280, 2, 2)
        assert resnet.eval()(x).shape == (4, 512, 2, 2)
    assert "fc.weight" not in resnet.state_dict() and "layer4.1.conv2.weight" in resnet.state_dict()
    assert len(mobilenet.sites) == 10 and len(resnet.sites) == 8


def _recognizer(backbone, channels=128, **kw):
    return MODELS.build(dict(
        type="Recognizer2D",
        backbone=dict(type="TSMSurgeryBackbone", num_segments=2, backbone=backbone, example_input_size=32, **kw),
        cls_head=dict(type="TSMHead", num_classes=3, in_channels=channels, num_segments=2, init_std=0.01)))


def test_init_weights_keeps_timm_weights():
    """mmengine's init_weights would walk into timm's modules; the plugin keeps them."""
    timm_cfg = dict(type="timm.resnet18", pretrained=False, channels=(16, 32, 64, 128), stem_width=16)
    model = _recognizer(timm_cfg)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.123)  # stands in for pretrained weights
    before = copy.deepcopy(model.backbone.state_dict())
    head_before = model.cls_head.fc_cls.weight.clone()
    model.init_weights()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.cls_head.fc_cls.weight)  # the head was initialised

    # The trap it guards against: a plain mmengine BaseModule holding a timm model calls the
    # model's own init_weights and re-initialises it.
    import timm
    from mmengine.model import BaseModule

    naive = BaseModule()
    naive.model = timm.create_model("resnet18", pretrained=False, channels=(16, 32, 64, 128), stem_width=16)
    with torch.no_grad():
        for p in naive.parameters():
            p.add_(0.123)
    before = copy.deepcopy(naive.state_dict())
    naive.init_weights()
    assert not all(torch.equal(before[k], v) for k, v in naive.state_dict().items())


def test_pretrained_checkpoint_loads_after_own_init(tmp_path):
    """An MMAction2 backbone runs its own init first, then the 2D checkpoint loads, keys unchanged."""
    source = ResNet(depth=18)
    randomize_norms(source)
    path = tmp_path / "r18_2d.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in source.state_dict().items()}}, path)
    model = _recognizer(dict(type="ResNet", depth=18), pretrained=str(path), pretrained_prefix="backbone.",
                        channels=512)
    model.init_weights()
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())


def test_pretrained_checkpoint_key_mismatch(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in ResNet(depth=18).state_dict().items()}}, path)
    ours = MODELS.build(dict(type="TSMSurgeryBackbone", backbone=dict(type="ResNet", depth=18),
                             pretrained=str(path), example_input_size=32))
    with pytest.raises(KeyError, match="pretrained_prefix='backbone.'"):
        ours.init_weights()
    missing = MODELS.build(dict(type="TSMSurgeryBackbone", backbone=dict(type="ResNet", depth=18),
                                pretrained=str(tmp_path / "nope.pth"), example_input_size=32))
    with pytest.raises(FileNotFoundError, match="model.backbone.pretrained"):
        missing.init_weights()


def test_num_segments_and_bad_batch():
    ours = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=4, backbone=dict(type="ResNet", depth=18),
                             example_input_size=32))
    with pytest.raises(ValueError, match=r"not a multiple of model.backbone.num_segments=4"):
        ours(torch.randn(6, 3, 32, 32))
    ours.num_segments = 3
    assert ours.num_segments == 3 and all(s.n_segments == 3 for s in ours.net.shift_modules().values())
    assert ours(torch.randn(6, 3, 32, 32)).shape == (6, 512, 1, 1)


@pytest.mark.parametrize("backbone, message", [
    (dict(type="NoSuchNet"), "model.backbone.backbone.type='NoSuchNet'"),
    (dict(type="timm.no_such_net"), "timm has no model"),
    (dict(type="ResNetTSM", depth=18), "already a TSM network"),
])
def test_unknown_inner_backbone(backbone, message):
    with pytest.raises((KeyError, ValueError), match=message):
        TSMSurgeryBackbone(backbone=backbone)


def test_bad_shift_place():
    with pytest.raises(ValueError, match="model.backbone.shift_place"):
        TSMSurgeryBackbone(backbone=dict(type="ResNet", depth=18), shift_place="somewhere")


def _tiny_swin(**extra):
    return dict(type="timm.swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), **extra)


@pytest.mark.parametrize("extra", [{}, {"feature_shape": "NHWC"}], ids=["output_fmt", "feature_shape"])
def test_wrapped_timm_nhwc_backbone_hands_the_head_nchw(extra):
    """Swin's maps are NHWC; the stock TSNHead pools NCHW. `feature_shape` is read, never passed to timm."""
    model = MODELS.build(dict(
        type="Recognizer2D",
        backbone=dict(type="TSMSurgeryBackbone", num_segments=2, backbone=_tiny_swin(**extra), example_input_size=64),
        cls_head=dict(type="TSNHead", num_classes=3, in_channels=256, init_std=0.01)))
    backbone = model.backbone.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        raw = backbone.net(x)  # the converted timm model's own NHWC output
        got = backbone(x)
        scores = model.cls_head(got, num_segs=2)  # the stock head takes the wrapped features as they are
    assert raw.shape == (4, 2, 2, 256) and got.shape == (4, 256, 2, 2)
    assert torch.equal(got, raw.permute(0, 3, 1, 2))
    assert scores.shape == (2, 3)


def test_wrapped_timm_tokens_become_an_l_by_1_map():
    vit = dict(type="timm.vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
               embed_dim=32, num_heads=2, feature_shape="NLC")
    backbone = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=2, backbone=vit, example_input_size=32)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        raw, got = backbone.net(x), backbone(x)
    assert raw.shape == (4, 17, 32) and got.shape == (4, 32, 17, 1)
    # The head's average pool over the map is Recognizer2D's NLC pool over tokens.
    assert torch.allclose(got.mean((2, 3)), raw.mean(1))


def test_bad_feature_shape():
    with pytest.raises(ValueError, match="feature_shape"):
        TSMSurgeryBackbone(backbone=_tiny_swin(feature_shape="HWNC"))


@pytest.mark.parametrize("prefix", ["mmpretrain", "mmcls"])
def test_openmmlab_prefixed_backbones_build_as_recognizer2d_builds_them(prefix):
    """`mmcls.` types build with mmpretrain (mmcls renamed) when mmcls is absent, as their registry names match."""
    from mmpretrain.models import ResNet as PretrainResNet

    ours = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=2, example_input_size=32,
                             backbone=dict(type=f"{prefix}.ResNet", depth=18, out_indices=(3,))))
    model2d = randomize_norms(PretrainResNet(depth=18, out_indices=(3,)))
    assert list(ours.state_dict()) == list(model2d.state_dict())
    ours.load_state_dict(model2d.state_dict())
    ref = tsm_surgery.convert(model2d, n_segments=2, example_input=torch.randn(1, 3, 32, 32)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), ref(x)[0])  # the 1-tuple mmpretrain returns is unpacked
    with pytest.raises(KeyError, match="has no model"):
        TSMSurgeryBackbone(backbone=dict(type=f"{prefix}.NoSuchNet"))


def test_mobileone_is_shifted_at_block_inputs_by_default():
    from mmaction.models.backbones import MobileOneTSM

    stock = randomize_norms(MobileOneTSM("s0", num_segments=2, pretrained2d=False))
    ours = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=2, example_input_size=32,
                             backbone=dict(type="mmpretrain.MobileOne", arch="s0")))
    ours.load_state_dict({k.replace(".net.", "."): v for k, v in stock.state_dict().items()}, strict=True)
    x = torch.randn(4, 3, 32, 32)
    ours.eval(), stock.eval()  # mmpretrain's train() returns None: no chaining
    with torch.no_grad():
        assert torch.equal(ours(x), stock(x))
    # stage0's input is the image: 3 // 8 = 0 channels move, so MobileOneTSM's shift there is a no-op.
    assert len(ours.sites) == sum(type(m).__name__ == "TemporalShift" for m in stock.modules()) - 1


def test_densenet_wraps_with_block_entry_policy():
    dense = dict(type="torchvision.densenet121", weights=None)
    with pytest.raises(ValueError, match="no_residual='block_entry'"):
        TSMSurgeryBackbone(backbone=dense, example_input_size=32)
    ours = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=2, backbone=dense, no_residual="block_entry",
                             example_input_size=32))
    assert ours.sites and all(s.kind == "block_entry" for s in ours.sites)
    assert ours(torch.randn(4, 3, 32, 32)).shape == (4, 1024, 1, 1)

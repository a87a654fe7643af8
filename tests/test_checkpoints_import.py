"""import_tsm_checkpoint: each anchor's layout, saved, imported and loaded, gives the source's outputs."""

import pytest
import torch
import torchvision
from paper_tsm import PaperMobileNetV2, calibrate_norms, paper_mobilenet_v2_tsn, paper_resnet_tsn
from utils import randomize_norms

import tsm_surgery
from tsm_surgery.integrations.checkpoints import CheckpointLayoutError, detect_layout, import_tsm_checkpoint

T = 4  # frames per clip


def _close(name, got, expected):
    diff = (got - expected).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g} (scale {expected.abs().max().item():.3g})")
    assert got.shape == expected.shape
    assert diff <= 1e-5 * max(1.0, expected.abs().max().item()), diff
    if expected.shape[0] > 1:  # the outputs depend on the input, or equal outputs would prove nothing
        assert (expected[0] - expected[1]).abs().max() > 1e-2 * expected.abs().max()


def _save(tmp_path, state, name="ckpt.pth", wrap=True):
    path = tmp_path / name
    torch.save({"epoch": 3, "arch": "x", "state_dict": state, "best_prec1": 1.0} if wrap else state, path)
    return path


def _tv_resnet(depth, num_classes):
    return getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)


def _paper_pair(tmp_path, depth, select=None):
    paper = randomize_norms(paper_resnet_tsn(depth, num_class=7, num_segments=T)).eval()
    path = _save(tmp_path, paper.state_dict())
    net = tsm_surgery.convert(_tv_resnet(depth, 7), n_segments=T, select=select).eval()
    return paper, path, net


def test_paper_resnet50_round_trip(tmp_path):
    paper, path, net = _paper_pair(tmp_path, 50)
    assert next(iter(paper.state_dict())).startswith("module.base_model.")
    assert "module.base_model.layer1.0.conv1.net.weight" in paper.state_dict()
    layout = detect_layout(path)
    assert layout.name == "paper" and layout.arch == "resnet50" and len(layout.shifts) == 16, layout
    net.load_state_dict(import_tsm_checkpoint(path, net))
    x = torch.randn(2 * T, 3, 32, 32)
    with torch.no_grad():
        expected, got = paper(x), net(x).view(2, T, -1).mean(1)
        plain = torchvision.models.resnet50(num_classes=7).eval()
        plain.load_state_dict(import_tsm_checkpoint(path))  # no model: torchvision keys
        flat = plain(x).view(2, T, -1).mean(1)
    _close("paper resnet50", got, expected)
    assert (flat - expected).abs().max() > 1e-3 * expected.abs().max()  # the shift matters


def test_paper_resnet101_every_other_block(tmp_path):
    every_other = lambda site: int(site.name.split(".")[1]) % 2 == 0  # noqa: E731
    paper, path, net = _paper_pair(tmp_path, 101, select=every_other)
    assert len(net.sites) == 18 and len(detect_layout(path).shifts) == 18
    net.load_state_dict(import_tsm_checkpoint(path, net))
    x = torch.randn(T, 3, 32, 32)
    with torch.no_grad():
        _close("paper resnet101", net(x).view(1, T, -1).mean(1), paper(x))
    # All 33 sites shifted: the same weights would give other numbers, so the import refuses.
    all_sites = tsm_surgery.convert(torchvision.models.resnet101(num_classes=7), n_segments=T)
    with pytest.raises(CheckpointLayoutError, match=r"shifts 15 sites .*layer1\.1"):
        import_tsm_checkpoint(path, all_sites)


def test_paper_mobilenet_v2_round_trip(tmp_path):
    paper = calibrate_norms(randomize_norms(paper_mobilenet_v2_tsn(num_class=5, num_segments=T)),
                            torch.randn(4 * T, 3, 32, 32))
    keys = paper.state_dict()
    assert "module.base_model.features.3.conv.0.net.weight" in keys
    assert "module.base_model.features.3.conv.7.weight" in keys
    path = _save(tmp_path, keys)
    layout = detect_layout(path)
    assert (layout.name, layout.arch, len(layout.shifts)) == ("paper", "mobilenet_v2", 10)
    net = tsm_surgery.convert(torchvision.models.mobilenet_v2(num_classes=5), n_segments=T).eval()
    net.load_state_dict(import_tsm_checkpoint(path, net))
    x = torch.randn(2 * T, 3, 32, 32)
    with torch.no_grad():
        expected = paper(x)
        _close("paper mobilenet_v2", net(x).view(2, T, -1).mean(1), expected)
        plain = torchvision.models.mobilenet_v2(num_classes=5).eval()
        plain.load_state_dict(import_tsm_checkpoint(path))
        flat = plain(x).view(2, T, -1).mean(1)
    assert (flat - expected).abs().max() > 1e-2 * expected.abs().max()  # the shift matters


def test_paper_online_layout_maps_onto_torchvision(tmp_path):
    # The 2D forward of the online demo's network (all shift buffers zero at the first frame
    # are not a 2D forward, so compare the structural map with the flat 2D MobileNetV2).
    paper = calibrate_norms(randomize_norms(PaperMobileNetV2(n_class=27)), torch.randn(8, 3, 32, 32))
    path = _save(tmp_path, paper.state_dict(), wrap=False)
    layout = detect_layout(path)
    assert layout.name == "paper-online" and len(layout.shifts) == 10 and "uni_slot='first'" in layout.hint
    plain = torchvision.models.mobilenet_v2(num_classes=27).eval()
    plain.load_state_dict(import_tsm_checkpoint(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close("paper flat mobilenet_v2 (2D)", plain(x), paper(x))


def test_wrong_depth_width_classes_and_unknown_layout(tmp_path):
    _, path, _ = _paper_pair(tmp_path, 18)
    r34 = tsm_surgery.convert(_tv_resnet(34, 7), n_segments=T)
    with pytest.raises(CheckpointLayoutError, match=r"ckpt\.pth: detected paper-repo TSN resnet18.*get no weights "
                                                    r"\(first: \['layer1\.2\."):
        import_tsm_checkpoint(path, r34)
    other_classes = tsm_surgery.convert(_tv_resnet(18, 9), n_segments=T)
    with pytest.raises(CheckpointLayoutError, match=r"fc\.weight: checkpoint \(7, 512\) vs model \(9, 512\)"):
        import_tsm_checkpoint(path, other_classes)
    narrow = torchvision.models.mobilenet_v2(num_classes=27, width_mult=0.5)
    mbv2 = _save(tmp_path, PaperMobileNetV2(n_class=27).state_dict(), "mbv2.pth", wrap=False)
    with pytest.raises(CheckpointLayoutError, match=r"mbv2\.pth: detected paper online-demo.*shapes differ"):
        import_tsm_checkpoint(mbv2, narrow)
    unknown = _save(tmp_path, {"encoder.weight": torch.zeros(2, 2)}, "other.pth")
    with pytest.raises(CheckpointLayoutError, match=r"other\.pth: no known TSM checkpoint layout.*encoder\.weight"):
        import_tsm_checkpoint(unknown)


def test_input_and_model_are_not_changed(tmp_path):
    paper = paper_resnet_tsn(18, num_class=7, num_segments=T)
    state = paper.state_dict()
    keys = list(state)
    net = tsm_surgery.convert(_tv_resnet(18, 7), n_segments=T)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = import_tsm_checkpoint(state, net)
    assert list(state) == keys and set(out) == set(before)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_cli_import_checkpoint_writes_once(tmp_path, capsys):
    from tsm_surgery.cli import main

    paper = paper_mobilenet_v2_tsn(num_class=5, num_segments=T)
    src, out = _save(tmp_path, paper.state_dict()), tmp_path / "imported.pth"
    assert main(["import-checkpoint", str(src), str(out)]) == 0
    assert "detected paper-repo TSN mobilenet_v2" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    expected = import_tsm_checkpoint(src)
    assert saved["meta"]["layout"] == "paper" and set(saved["state_dict"]) == set(expected)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in expected.items())
    # An existing OUT is never written over without --force.
    out.write_bytes(b"keep")
    assert main(["import-checkpoint", str(src), str(out)]) == 1
    assert "already exists; refusing to overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["import-checkpoint", str(src), str(out), "--force"]) == 0
    assert set(torch.load(out, weights_only=True)["state_dict"]) == set(expected)
    # An unknown layout: an error naming the file, nothing written.
    other = _save(tmp_path, {"encoder.weight": torch.zeros(2, 2)}, "other.pth")
    assert main(["import-checkpoint", str(other), str(tmp_path / "o.pth")]) == 1
    assert "other.pth: no known TSM checkpoint layout" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


def _recognizer(backbone, in_channels, num_classes=6):
    from mmaction.registry import MODELS

    cfg = dict(type="Recognizer2D", backbone=backbone,
               cls_head=dict(type="TSMHead", num_classes=num_classes, in_channels=in_channels, num_segments=T,
                             spatial_type="avg", consensus=dict(type="AvgConsensus", dim=1), dropout_ratio=0.5,
                             is_shift=True, average_clips="score"),
               data_preprocessor=dict(type="ActionDataPreprocessor", format_shape="NCHW"))
    return MODELS.build(cfg)


def _scores(recognizer, clips):
    """Class scores (N, K) of (N, T, 3, H, W) clips: backbone, neck and head, no post-processing."""
    return recognizer._forward(clips, stage="head")


STOCK = {
    "ResNetTSM": (dict(type="ResNetTSM", depth=50, num_segments=T, shift_div=8, norm_eval=False, pretrained2d=False),
                  dict(type="TSMSurgeryBackbone", num_segments=T, backbone=dict(type="ResNet", depth=50)), 2048),
    "MobileNetV2TSM": (dict(type="MobileNetV2TSM", num_segments=T, shift_div=8, pretrained2d=False),
                       dict(type="TSMSurgeryBackbone", num_segments=T, backbone=dict(type="MobileNetV2")), 1280),
}


@pytest.mark.parametrize("stock", sorted(STOCK))
def test_mmaction_stock_round_trip(stock, tmp_path):
    pytest.importorskip("mmaction")
    from mmengine.registry import init_default_scope

    import tsm_surgery.integrations.mmaction

    init_default_scope("mmaction")
    source_cfg, ours_cfg, channels = STOCK[stock]
    x = torch.randn(2, T, 3, 32, 32)
    source = calibrate_norms(randomize_norms(_recognizer(source_cfg, channels)), x)
    assert any(".net." in k for k in source.state_dict())
    path = _save(tmp_path, source.state_dict())
    ours = _recognizer(ours_cfg, channels).eval()
    layout = detect_layout(path)
    assert layout.name == "mmaction2" and layout.arch.startswith(stock), layout
    ours.load_state_dict(import_tsm_checkpoint(path, ours))
    with torch.no_grad():
        expected = _scores(source, x)
        _close(f"mmaction2 {stock}", _scores(ours, x), expected)
    if stock == "ResNetTSM":  # MMAction2's ResNet naming into torchvision's, head into fc
        net = tsm_surgery.convert(torchvision.models.resnet50(num_classes=6), n_segments=T).eval()
        net.load_state_dict(import_tsm_checkpoint(path, net))
        with torch.no_grad():
            _close("mmaction2 ResNetTSM -> torchvision", net(x.flatten(0, 1)).view(2, T, -1).mean(1), expected)


def test_paper_resnet_into_mmaction_recognizer_and_back(tmp_path):
    """A paper checkpoint loads into an MMAction2 config's model (ResNet naming and head translated)."""
    pytest.importorskip("mmaction")
    from mmengine.registry import init_default_scope

    import tsm_surgery.integrations.mmaction

    init_default_scope("mmaction")
    paper, path, _ = _paper_pair(tmp_path, 18)
    backbone = dict(type="TSMSurgeryBackbone", num_segments=T, backbone=dict(type="ResNet", depth=18))
    ours = _recognizer(backbone, 512, num_classes=7).eval()
    state = import_tsm_checkpoint(path, ours)
    assert "backbone.layer1.0.conv1.conv.weight" in state and "cls_head.fc_cls.weight" in state
    ours.load_state_dict(state)
    x = torch.randn(2, T, 3, 32, 32)
    with torch.no_grad():
        expected = paper(x.flatten(0, 1))
        _close("paper resnet18 -> mmaction2 recognizer", _scores(ours, x), expected)
    # And an MMAction2 recognizer checkpoint into a torchvision network.
    mm_path = _save(tmp_path, ours.state_dict(), "mm.pth")
    net = tsm_surgery.convert(_tv_resnet(18, 7), n_segments=T).eval()
    with pytest.raises(CheckpointLayoutError, match="no known TSM checkpoint layout"):
        import_tsm_checkpoint(mm_path, net)  # no `.net` wrappers: plain keys of this project, no import needed


def test_bi_checkpoint_into_uni_model_warns(tmp_path, caplog):
    _, path, _ = _paper_pair(tmp_path, 18)
    uni = tsm_surgery.convert(_tv_resnet(18, 7), n_segments=T, direction="uni")
    with caplog.at_level("WARNING", logger="tsm_surgery.integrations.checkpoints"):
        uni.load_state_dict(import_tsm_checkpoint(path, uni))  # legitimate for fine-tuning, so it loads
    assert "direction='bi'" in caplog.text and "cannot stream: fine-tune it as uni" in caplog.text


# Stock configs whose backbones need the surgery equivalents (STOCK_EQUIVALENTS): each is built
# as shipped (random weights), saved, imported into the type-swapped config's model.
STOCK_CONFIGS = {
    "r50-nl-embedded-gaussian": "tsm/tsm_imagenet-pretrained-r50-nl-embedded-gaussian_8xb16-1x1x8-50e_kinetics400-rgb",
    "r101": "tsm/tsm_imagenet-pretrained-r101_8xb16-1x1x8-50e_sthv2-rgb",  # slow; test_paper_resnet101 covers it
    "mobileone-s4": "tsm/tsm_imagenet-pretrained-mobileone-s4_8xb16-1x1x16-50e_kinetics400-rgb",
    "mobileone-s4-deploy": "tsm/tsm_imagenet-pretrained-mobileone-s4_deploy_8xb16-1x1x16-50e_kinetics400-rgb",
    "tpn-tsm": "tpn/tpn-tsm_imagenet-pretrained-r50_8xb8-1x1x8-150e_sthv1-rgb",
}


def _stock_model_cfgs(name):
    import copy
    import os

    import mmaction
    from mmengine.config import Config

    from tsm_surgery.integrations.mmaction import STOCK_EQUIVALENTS

    path = os.path.join(os.path.dirname(mmaction.__file__), ".mim", "configs", "recognition",
                        STOCK_CONFIGS[name] + ".py")
    source = Config.fromfile(path).model.to_dict()
    source["backbone"].update(pretrained2d=False, num_segments=8)
    source["backbone"].pop("init_cfg", None)  # MobileOne's pretrained weights
    if "pretrained" in source["backbone"]:
        source["backbone"]["pretrained"] = None
    if "num_segments" in source["cls_head"]:
        source["cls_head"]["num_segments"] = 8
    ours = copy.deepcopy(source)
    ours["backbone"]["type"] = STOCK_EQUIVALENTS[source["backbone"]["type"]]
    return source, ours


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "r101" else n
                                  for n in sorted(STOCK_CONFIGS)])
def test_stock_config_checkpoint_round_trip(name, tmp_path):
    pytest.importorskip("mmaction")
    from mmaction.registry import MODELS
    from mmengine.registry import init_default_scope

    import tsm_surgery.integrations.mmaction  # noqa: F401

    init_default_scope("mmaction")
    if "mobileone" in name:
        pytest.importorskip("mmpretrain")
    source_cfg, ours_cfg = _stock_model_cfgs(name)
    x = torch.randn(2, 8, 3, 64, 64)
    deploy = source_cfg["backbone"].pop("deploy", False)
    source = calibrate_norms(randomize_norms(MODELS.build(source_cfg)), x)
    if deploy:  # reparameterised from calibrated norms, as a deploy checkpoint is made; random ones fade the signal
        source.backbone.switch_to_deploy()
        assert any(".net.branch_reparam." in k for k in source.state_dict())
    path = _save(tmp_path, source.state_dict())
    layout = detect_layout(path)
    assert layout.name == "mmaction2", layout
    ours = MODELS.build(ours_cfg).eval()
    ours.load_state_dict(import_tsm_checkpoint(path, ours))
    with torch.no_grad():
        _close(f"mmaction2 {name}", _scores(ours, x), _scores(source, x))


def test_pretrained_and_fine_tuning_accept_paper_checkpoints(tmp_path):
    """`pretrained=` takes a paper checkpoint directly; load_from's fine-tuning mode keeps a head of another size."""
    pytest.importorskip("mmaction")
    from mmaction.registry import MODELS
    from mmengine.registry import init_default_scope

    import tsm_surgery.integrations.mmaction  # noqa: F401
    from tsm_surgery.integrations.checkpoints import convert_state_dict

    init_default_scope("mmaction")
    _, path, _ = _paper_pair(tmp_path, 18)
    backbone = MODELS.build(dict(type="TSMSurgeryBackbone", num_segments=T, pretrained=str(path),
                                 backbone=dict(type="ResNet", depth=18)))
    backbone.init_weights()
    expected = import_tsm_checkpoint(path, backbone)
    assert set(expected) == set(backbone.state_dict())
    assert all(torch.equal(v, expected[k]) for k, v in backbone.state_dict().items())
    # Fine-tuning on 9 classes: the backbone must fit, the 7-class head stays the model's own.
    nine = _recognizer(dict(type="TSMSurgeryBackbone", num_segments=T, backbone=dict(type="ResNet", depth=18)),
                       512, num_classes=9)
    with pytest.raises(CheckpointLayoutError, match=r"cls_head\.fc_cls\.weight: checkpoint \(7, 512\)"):
        import_tsm_checkpoint(path, nine)
    state, layout = convert_state_dict(torch.load(path, weights_only=True)["state_dict"], nine, strict=False)
    assert layout.arch == "resnet18" and not any(k.startswith("cls_head.") for k in state)
    assert set(state) == {k for k in nine.state_dict() if k.startswith("backbone.")}

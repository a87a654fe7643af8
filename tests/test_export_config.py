"""``export --config``: a trained MMAction2 recognizer exported with its config's settings and normalisation.

The runtime's per-frame logits are checked against the recognizer itself (MMAction2's backbone and
head on the config's normalisation), and ``stream --engine`` on the export against ``stream
--config`` on the checkpoint."""

import json
import re

import numpy as np
import pytest
import torch
from utils import randomize_norms, write_video

from tsm_surgery.cli import main
from tsm_surgery.integrations.export import load

pytest.importorskip("mmaction")
pytest.importorskip("onnxruntime")

SIZE, SEGMENTS, CLASSES = 48, 4, 5
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
CONFIG = """
default_scope = 'mmaction'
custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)
model = dict(
    type='Recognizer2D',
    backbone=dict(type='TSMSurgeryBackbone', backbone=dict(type='timm.resnet18'), num_segments={segments},
                  direction='{direction}', shift_div={shift_div}, example_input_size={size}),
    cls_head=dict(type='TSMHead', num_classes={classes}, in_channels=512, num_segments={segments},
                  spatial_type='avg', consensus=dict(type='AvgConsensus', dim=1), dropout_ratio=0.5,
                  is_shift=True, average_clips='prob'),
    data_preprocessor=dict(type='ActionDataPreprocessor', mean={mean}, std={std}, format_shape='NCHW'))
test_pipeline = [dict(type='DecordInit'), dict(type='Resize', scale=(-1, 56)),
                 dict(type='CenterCrop', crop_size={size}), dict(type='FormatShape', input_format='NCHW')]
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """direction -> (config path, checkpoint path, recognizer): random weights saved as a trained checkpoint."""
    from tsm_surgery.integrations.mmaction.recognizer import load_recognizer

    made = {}

    def get(direction):
        if direction not in made:
            root = tmp_path_factory.mktemp(f"config_{direction}")
            config = root / f"tsm_{direction}.py"
            # shift_div 4: not the export's default 8, so the config's own value must reach the sidecar
            config.write_text(CONFIG.format(direction=direction, segments=SEGMENTS, shift_div=4, size=SIZE,
                                            classes=CLASSES, mean=MEAN, std=STD))
            torch.manual_seed(0)
            recognizer = randomize_norms(load_recognizer(str(config)))
            torch.save({"state_dict": recognizer.state_dict(), "meta": {}}, root / "epoch_1.pth")
            made[direction] = (config, root / "epoch_1.pth", recognizer)
        return made[direction]

    return get


def _frames():
    return np.random.default_rng(3).integers(0, 256, (SEGMENTS, SIZE, SIZE, 3), dtype=np.uint8)


def _normalised(frames):
    """What MMAction2's data preprocessor makes of RGB frames: (T, 3, H, W) on the 0-255 scale."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@torch.no_grad()
def test_online_export_streams_the_recognizers_per_frame_logits(trained, tmp_path):
    from tsm_surgery.integrations.streaming.stream import Preprocess

    config, checkpoint, recognizer = trained("uni")
    out = tmp_path / "tsm_uni.onnx"
    assert main(["export", "--config", str(config), "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    # the config fixes the size (its test CenterCrop), the shift and the normalisation
    assert sidecar["input_size"] == SIZE and sidecar["shift_div"] == 4 and sidecar["config"] == str(config)
    assert sidecar["outputs"][0]["shape"] == [1, CLASSES]
    np.testing.assert_allclose(sidecar["preprocess"]["mean"], np.array(MEAN) / 255, rtol=1e-6)
    np.testing.assert_allclose(sidecar["preprocess"]["std"], np.array(STD) / 255, rtol=1e-6)
    frames = _frames()
    pre = sidecar["preprocess"]
    runner = load(str(out.with_suffix(".json")))
    got = np.concatenate([runner.step(Preprocess(pre["size"], pre["mean"], pre["std"])(f)) for f in frames])
    # MMAction2's own modules: the uni backbone on the clip, the head on each frame as a one-frame clip
    features = recognizer.backbone(_normalised(frames))
    head = recognizer.cls_head
    head.num_segments = 1
    try:
        expected = head(features, num_segs=1)
    finally:
        head.num_segments = SEGMENTS
    assert _rel(got, expected) <= 1e-4
    assert _rel(expected[1:2], recognizer.cls_head.fc_cls(features[:1].mean((2, 3)))) > 1e-2  # frames differ


@torch.no_grad()
def test_offline_export_of_a_bi_config_averages_to_the_recognizers_score(trained, tmp_path):
    config, checkpoint, recognizer = trained("bi")
    out = tmp_path / "tsm_bi.onnx"
    assert main(["export", "--config", str(config), "--checkpoint", str(checkpoint), "--offline",
                 "--output", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["direction"] == "bi" and sidecar["n_segments"] == SEGMENTS
    clips = torch.cat([_normalised(_frames()), _normalised(_frames()[::-1].copy())])
    per_frame = load(str(out.with_suffix(".json"))).run(clips)
    # TSMHead: average consensus of the per-frame scores of each clip
    expected = recognizer.cls_head(recognizer.backbone(clips), num_segs=SEGMENTS)
    assert _rel(per_frame.reshape(2, SEGMENTS, CLASSES).mean(1), expected) <= 1e-4


def test_stream_engine_on_the_export_prints_what_stream_config_prints(trained, tmp_path, capsys):
    config, checkpoint, _ = trained("uni")
    video = tmp_path / "clip.mp4"
    write_video(str(video), 1, frames=SEGMENTS, size=SIZE)
    out = tmp_path / "tsm_uni.onnx"
    assert main(["export", "--config", str(config), "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    capsys.readouterr()

    def top1(argv):
        assert main(argv) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("frame ")]
        return [re.search(r"top-1: (\d+):([\d.]+)", line).groups() for line in lines]

    exported = top1(["stream", "--engine", "onnx", str(out.with_suffix(".json")), str(video), "--topk", "1"])
    pytorch = top1(["stream", str(video), "--config", str(config), "--checkpoint", str(checkpoint),
                    "--size", str(SIZE), "--topk", "1"])
    assert len(exported) == SEGMENTS and [c for c, _ in exported] == [c for c, _ in pytorch]
    assert max(abs(float(p) - float(q)) for (_, p), (_, q) in zip(exported, pytorch)) <= 2e-3


@pytest.mark.parametrize("argv,says", [
    (["--n-segments", "8"], "--n-segments"),
    (["--shift-div", "8", "--num-classes", "3"], "--shift-div, --num-classes"),
])
def test_settings_the_config_fixes_are_refused(trained, tmp_path, capsys, argv, says):
    config, checkpoint, _ = trained("uni")
    assert main(["export", "--config", str(config), "--checkpoint", str(checkpoint),
                 "--output", str(tmp_path / "x.onnx"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "config" in err
    assert list(tmp_path.iterdir()) == []


def test_a_bi_config_has_no_online_step(trained, tmp_path, capsys):
    config, checkpoint, _ = trained("bi")
    assert main(["export", "--config", str(config), "--checkpoint", str(checkpoint),
                 "--output", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "direction='bi'" in err and "--offline" in err
    assert list(tmp_path.iterdir()) == []


def test_model_and_config_are_one_choice(tmp_path, capsys):
    assert main(["export", "--model", "timm:resnet18", "--config", str(tmp_path / "c.py")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--config: not allowed with argument --model" in err


@pytest.mark.slow  # calibration decodes videos and quantizes (tens of seconds)
@torch.no_grad()
def test_int8_export_of_a_config_calibrates_on_its_normalisation(trained, tmp_path):
    from tsm_surgery.integrations.streaming.stream import Preprocess

    config, checkpoint, recognizer = trained("uni")
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        write_video(str(videos / f"v{i}.mp4"), 1 if i % 2 else -1, frames=SEGMENTS, size=SIZE, seed=i)
    out = tmp_path / "out" / "tsm_uni_int8.onnx"
    out.parent.mkdir()
    assert main(["export", "--config", str(config), "--checkpoint", str(checkpoint), "--int8",
                 "--calibration", str(videos), "--output", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["dtype"] == "int8" and sidecar["calibration_clips"] == 4
    pre = sidecar["preprocess"]
    runner = load(str(out.with_suffix(".json")))
    from tsm_surgery.integrations.streaming.stream import decode

    frames = list(decode(str(videos / "v1.mp4")))
    got = np.concatenate([runner.step(Preprocess(pre["size"], pre["mean"], pre["std"])(f)) for f in frames])
    head = recognizer.cls_head
    head.num_segments = 1
    try:
        expected = head(recognizer.backbone(_normalised(np.stack(frames))), num_segs=1)
    finally:
        head.num_segments = SEGMENTS
    # int8 on calibrated data: close to float32 (a wrong normalisation would put the range elsewhere)
    assert _rel(got, expected) <= 0.15


def _stock_recognizer(backbone, channels):
    from mmengine.config import Config

    from tsm_surgery.integrations.mmaction.recognizer import load_recognizer

    head = dict(type="TSMHead", num_classes=CLASSES, in_channels=channels, num_segments=SEGMENTS, spatial_type="avg",
                consensus=dict(type="AvgConsensus", dim=1), is_shift=True, average_clips="prob")
    cfg = Config(dict(default_scope="mmaction", model=dict(type="Recognizer2D", backbone=backbone, cls_head=head)))
    torch.manual_seed(0)
    return randomize_norms(load_recognizer(cfg))


STOCK = dict(num_segments=SEGMENTS, pretrained=None, pretrained2d=False)


@pytest.mark.parametrize("backbone,channels", [
    (dict(type="TSMSurgeryResNet", depth=18, **STOCK), 512),
    (dict(type="TSMSurgeryMobileNetV2", **STOCK), 1280),
], ids=["ResNetTSM", "MobileNetV2TSM"])
@torch.no_grad()
def test_stock_types_per_frame_network_is_the_recognizers(backbone, channels):
    from tsm_surgery.integrations.mmaction.recognizer import frame_classifier

    recognizer = _stock_recognizer(backbone, channels)
    net = frame_classifier(recognizer, (3, SIZE, SIZE))
    assert [s.name for s in net.sites] == [f"0.{s.name}" for s in recognizer.backbone.net.sites]
    clip = torch.randn(SEGMENTS, 3, SIZE, SIZE)
    head = recognizer.cls_head
    head.num_segments = 1
    expected = head(recognizer.backbone(clip), num_segs=1)
    torch.testing.assert_close(net(clip), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone,channels,says", [
    (dict(type="TSMSurgeryResNet", depth=18, temporal_pool=True, **STOCK), 512, "temporal pooling"),
    (dict(type="TSMSurgeryMobileOne", arch="s0", num_segments=SEGMENTS), 1024, "block inputs"),
], ids=["temporal_pool", "MobileOne"])
def test_backbones_without_a_per_frame_form_are_refused(backbone, channels, says):
    from tsm_surgery.integrations.mmaction.recognizer import frame_classifier

    with pytest.raises(ValueError, match=says):
        frame_classifier(_stock_recognizer(backbone, channels), (3, SIZE, SIZE))

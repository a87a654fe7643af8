"""No path unpickles a checkpoint in full except an explicit resume of that same file.

Every checkpoint here carries an object whose ``__reduce__`` creates a marker directory when
unpickled in full. Each path that loads a checkpoint gets it, with the trusted-resume
environment variable set; the marker must appear only when that very file is resumed.
Also: one strict loader and one message for every inference path, and clear one-line CLI errors.
"""

import os

import pytest
import torch

pytest.importorskip("mmaction")

from utils import make_dataset, write_config, write_video

from tsm_surgery.cli import main
from tsm_surgery.integrations.checkpoints.loading import (
    CheckpointLoadError,
    CheckpointMismatchError,
    load_state_dict_file,
)
from tsm_surgery.integrations.mmaction.checkpoint import TRUST_ENV, trusted_resume
from tsm_surgery.integrations.training import runner as api


class Marker:
    """Unpickled in full, it creates a directory: evidence that a checkpoint ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data = make_dataset(str(tmp_path_factory.mktemp("videos")), per_class=1, frames=8)
    return write_config(str(tmp_path_factory.mktemp("cfg") / "tiny.py"), data, num_frames=4, max_epochs=1)


@pytest.fixture(scope="module")
def resumable(config, tmp_path_factory):
    """A real checkpoint written by mmengine's Runner (optimizer, message hub), before any epoch."""
    work_dir = tmp_path_factory.mktemp("resumable")
    runner = api.train(config, work_dir=str(work_dir), cfg_options={"train_cfg.max_epochs": 0})
    runner.save_checkpoint(str(work_dir), "epoch_0.pth")
    return str(work_dir / "epoch_0.pth")


def _with_marker(source, path, marker):
    state = torch.load(source, map_location="cpu", weights_only=False)  # our own file: no marker in it
    state["extra"] = Marker(marker)
    torch.save(state, path)
    return str(path)


@pytest.fixture
def evil(resumable, tmp_path, monkeypatch):
    """(checkpoint with the marker object, marker path); the env opt-in is on for every test."""
    monkeypatch.setenv(TRUST_ENV, "1")
    marker = tmp_path / "MARKER"
    return _with_marker(resumable, tmp_path / "evil.pth", marker), marker


def _fails_naming(capsys, argv, *needles):
    """Exit 1 and, as the last line on stderr (`test` logs there too), one line naming the cause."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert line.startswith(f"tsm-surgery {argv[0]}: ") and "Traceback" not in err, err.splitlines()[-3:]
    for needle in needles:
        assert needle in line, line
    return line


def test_test_verb_never_unpickles_even_with_the_env_opt_in(evil, config, tmp_path, capsys):
    path, marker = evil
    _fails_naming(capsys, ["test", config, path, "--work-dir", str(tmp_path / "w")], "evil.pth", "os.makedirs")
    assert not marker.exists()


def test_load_from_and_dash_dash_load_from_are_weights_only(evil, config, tmp_path, capsys):
    path, marker = evil
    _fails_naming(capsys, ["train", config, "--work-dir", str(tmp_path / "a"), "--load-from", path], "os.makedirs")
    with pytest.raises(CheckpointLoadError, match="evil.pth") as info:
        api.train(config, work_dir=str(tmp_path / "b"), cfg_options={"load_from": path})
    assert info.value.refused_global == "os.makedirs"
    assert not marker.exists()


def test_bare_resume_with_load_from_on_a_fresh_work_dir_loads_weights_only(evil, config, tmp_path, capsys):
    path, marker = evil
    _fails_naming(capsys, ["train", config, "--work-dir", str(tmp_path / "fresh"), "--resume", "--load-from", path],
                  "evil.pth", "os.makedirs")
    assert not marker.exists()
    with pytest.raises(ValueError, match="both name a checkpoint"):
        api.train(config, work_dir=str(tmp_path / "fresh2"), resume=path, load_from=path)
    assert not marker.exists()


def test_pretrained_is_weights_only_even_inside_a_trusted_resume(evil):
    from mmaction.registry import MODELS

    path, marker = evil
    backbone = MODELS.build(dict(type="TSMSurgeryBackbone", backbone=dict(type="ResNet", depth=18),
                                 pretrained=path, example_input_size=32))
    with trusted_resume(path), pytest.raises(CheckpointLoadError, match="model.backbone.pretrained.*os.makedirs"):
        backbone.init_weights()
    assert not marker.exists()


def test_stream_export_convert_are_weights_only(evil, config, tmp_path, capsys):
    path, marker = evil
    video = str(tmp_path / "v.mp4")
    write_video(video, 1)
    _fails_naming(capsys, ["stream", video, "--model", "timm:resnet18", "--checkpoint", path], "os.makedirs")
    _fails_naming(capsys, ["stream", video, "--config", config, "--checkpoint", path], "os.makedirs")
    _fails_naming(capsys, ["export", "--model", "timm:resnet18", "--checkpoint", path, "--output",
                           str(tmp_path / "x.onnx")], "evil.pth", "os.makedirs")
    _fails_naming(capsys, ["convert", "timm:resnet18", "--checkpoint", path], "evil.pth", "os.makedirs")
    _fails_naming(capsys, ["import-checkpoint", path, str(tmp_path / "imported.pth")], "evil.pth", "os.makedirs")
    assert not marker.exists()
    assert not (tmp_path / "x.onnx").exists()


def test_explicit_resume_of_that_file_is_the_one_opt_in(evil, config, tmp_path, monkeypatch):
    path, marker = evil
    monkeypatch.delenv(TRUST_ENV)
    work_dir = tmp_path / "resumed"
    runner = api.train(config, work_dir=str(work_dir), resume=path, cfg_options={"train_cfg.max_epochs": 0})
    assert marker.is_dir()  # the one file resumed was unpickled in full...
    logs = "".join(p.read_text() for p in work_dir.rglob("*.log"))
    assert "WARNING" in logs and f"{path}: unpickling this checkpoint in full" in logs  # ...and said so
    assert runner.epoch == 1  # the state came from the checkpoint (saved as "epoch 1")


def test_env_opt_in_reaches_only_the_resumed_file(resumable, config, tmp_path, monkeypatch):
    """Config resume=True + the env var: the work dir's last checkpoint is trusted, load_from is not used."""
    work_dir = tmp_path / "auto"
    work_dir.mkdir()
    own = _with_marker(resumable, work_dir / "epoch_0.pth", tmp_path / "OWN")
    other = _with_marker(resumable, tmp_path / "other.pth", tmp_path / "OTHER")
    (work_dir / "last_checkpoint").write_text(own)
    options = {"train_cfg.max_epochs": 0, "resume": True, "load_from": other}
    with pytest.raises(CheckpointLoadError, match="epoch_0.pth"):  # no opt-in: refused
        api.train(config, work_dir=str(work_dir), cfg_options=options)
    assert not (tmp_path / "OWN").exists()
    monkeypatch.setenv(TRUST_ENV, "1")
    runner = api.train(config, work_dir=str(work_dir), cfg_options=options)
    assert (tmp_path / "OWN").is_dir() and not (tmp_path / "OTHER").exists()
    assert runner.epoch == 1  # the state came from the checkpoint (saved as "epoch 1")


def _recognizer_state(config, **cfg_changes):
    from mmaction.apis import init_recognizer
    from mmengine.config import Config

    cfg = Config.fromfile(config)
    cfg.merge_from_dict(cfg_changes)
    return init_recognizer(cfg, None, device="cpu"), cfg


def test_stream_config_checkpoint_is_strict(resumable, config, tmp_path, capsys):
    """A checkpoint whose keys do not match: an error naming the file (it used to stream random weights)."""
    video = str(tmp_path / "v.mp4")
    write_video(video, 1)
    state = torch.load(resumable, map_location="cpu", weights_only=False)
    state["state_dict"] = {k.replace("layer1.", "stage1."): v for k, v in state["state_dict"].items()}
    other = tmp_path / "renamed.pth"
    torch.save(state, other)
    _fails_naming(capsys, ["stream", video, "--config", config, "--checkpoint", str(other)],
                  "renamed.pth", "does not match the model", "backbone.layer1.0.conv1")
    with pytest.raises(CheckpointMismatchError, match="renamed.pth"):  # the Python form: the same loader
        load_state_dict_file(str(other), _recognizer_state(config)[0])


def test_train_made_checkpoint_for_a_timm_model_gets_our_message(resumable, tmp_path, capsys):
    """The message hub loads with weights_only=True; the keys then say it belongs with --config."""
    video = str(tmp_path / "v.mp4")
    write_video(video, 1)
    for argv in (["stream", video, "--model", "timm:resnet18", "--checkpoint", resumable],
                 ["export", "--model", "timm:resnet18", "--checkpoint", resumable,
                  "--output", str(tmp_path / "x.onnx")]):
        line = _fails_naming(capsys, argv, "epoch_0.pth", "does not match the model", "--config")
        assert "weights_only=False" not in line and "Python objects" not in line


def test_stream_config_uses_the_checkpoint_weights(config, tmp_path, capsys):
    """An mmengine-style checkpoint (message hub included) streams with its weights: a head bias that
    makes class 1 certain shows in every frame's top-1."""
    from mmengine.logging import MessageHub

    recognizer, cfg = _recognizer_state(config, model=dict(backbone=dict(direction="uni")))
    uni_config = tmp_path / "uni.py"
    cfg.dump(str(uni_config))
    with torch.no_grad():
        recognizer.cls_head.fc_cls.bias.copy_(torch.tensor([0.0, 60.0]))
    hub = MessageHub.get_instance("stream-weights-test")
    hub.update_scalar("train/loss", 0.5)
    checkpoint = tmp_path / "uni.pth"
    torch.save({"state_dict": recognizer.state_dict(), "message_hub": hub.state_dict(), "meta": {}}, checkpoint)
    video = str(tmp_path / "v.mp4")
    write_video(video, 1)
    assert main(["stream", video, "--config", str(uni_config), "--checkpoint", str(checkpoint), "--size", "32"]) == 0
    frames = [line for line in capsys.readouterr().out.splitlines() if line.startswith("frame")]
    assert len(frames) == 8 and all("top-2: 1:1.000" in line for line in frames), frames

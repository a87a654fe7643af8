"""A TSM checkpoint's shift (direction, uni slot, shifted blocks) is checked against the model that runs it on
every path that loads weights before converting: ``stream``, ``export``, ``convert --checkpoint`` and
``import_tsm_checkpoint`` with an unconverted model. The checkpoints are built locally from the paper's
published code (tests/paper_tsm.py): its online MobileNetV2 (trained uni, slot 'first') and its bi TSN ResNet."""

import json
import logging

import pytest
import torch
import torchvision
from paper_tsm import PaperMobileNetV2, calibrate_norms, online_buffers, paper_resnet_tsn
from utils import randomize_norms

from tsm_surgery.cli import main
from tsm_surgery.integrations.checkpoints import import_tsm_checkpoint

pytest.importorskip("av")
from utils import write_video

SIZE = 32
MOBILENET = ["--model", "torchvision:mobilenet_v2", "--num-classes", "27", "--size", str(SIZE)]


@pytest.fixture(scope="module")
def online_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    paper = randomize_norms(PaperMobileNetV2(n_class=27, online=True))
    frames = torch.randn(8, 3, SIZE, SIZE)
    calibrate_norms(paper, frames, *online_buffers(paper, frames))
    path = tmp_path_factory.mktemp("paper") / "mobilenetv2_jester_online.pth.tar"
    torch.save(paper.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def bi_checkpoint(tmp_path_factory):
    """The paper's bi TSN (ResNet-18: ResNet-50's layout, less time)."""
    paper = randomize_norms(paper_resnet_tsn(18, num_class=7, num_segments=8)).eval()
    path = tmp_path_factory.mktemp("paper") / "tsm_r18_bi.pth"
    torch.save({"epoch": 3, "state_dict": paper.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("video") / "v.mp4")
    write_video(path, 1, frames=4)
    return path


def _stream(capsys, video, checkpoint, *extra):
    assert main(["stream", video, *MOBILENET, "--checkpoint", checkpoint, "--topk", "3", *extra]) == 0
    out, err = capsys.readouterr()
    # the top-k of each frame, without its speed
    predictions = [line.split("top-")[1] for line in out.splitlines() if line.lstrip().startswith("frame")]
    assert predictions, out
    return predictions, err


def test_stream_runs_the_online_checkpoint_with_its_slot_and_says_so(capsys, video, online_checkpoint):
    default, said = _stream(capsys, video, online_checkpoint)
    assert "uni_slot='first'" in said and "--uni-slot" in said
    first, said_first = _stream(capsys, video, online_checkpoint, "--uni-slot", "first")
    past, said_past = _stream(capsys, video, online_checkpoint, "--uni-slot", "past")
    assert default == first  # the same predictions and probabilities, frame by frame
    assert past != first
    assert "warning" not in said_first
    # chosen explicitly: kept, with the checkpoint check's warning
    assert "warning:" in said_past and "uni_slot='past'" in said_past


def test_stream_of_a_bi_checkpoint_warns_it_cannot_stream(capsys, video, bi_checkpoint):
    assert main(["stream", video, "--model", "torchvision:resnet18", "--num-classes", "7", "--size", str(SIZE),
                 "--checkpoint", bi_checkpoint]) == 0
    err = capsys.readouterr().err
    assert "direction='bi'" in err and "cannot stream" in err


def test_export_takes_the_checkpoints_slot_and_has_uni_slot(tmp_path, capsys, online_checkpoint):
    out = tmp_path / "online.onnx"
    argv = ["export", *MOBILENET, "--checkpoint", online_checkpoint, "--exporter", "legacy", "--output", str(out)]
    assert main(argv) == 0
    assert "uni_slot='first'" in capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["uni_slot"] == "first"
    assert main(argv + ["--uni-slot", "past", "--force"]) == 0
    assert "warning:" in capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["uni_slot"] == "past"
    assert main(argv + ["--offline", "--uni-slot", "first", "--force"]) == 1  # a bi network has no uni slot
    assert "--uni-slot applies to a uni shift" in capsys.readouterr().err


def test_convert_checks_the_shifted_blocks_and_direction(capsys, bi_checkpoint):
    base = ["convert", "torchvision:resnet18", "--num-classes", "7", "--n-segments", "8", "--checkpoint", bi_checkpoint]
    assert main(base) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(base + ["--select", "layer4.*"]) == 1  # the checkpoint's model shifts every block
    assert "which the model does not" in capsys.readouterr().err
    assert main(base + ["--direction", "uni"]) == 0
    assert "cannot stream" in capsys.readouterr().err


def test_import_into_an_unconverted_model_says_it_has_no_shift(caplog, bi_checkpoint):
    model = torchvision.models.resnet18(num_classes=7)
    with caplog.at_level(logging.WARNING, logger="tsm_surgery.integrations.checkpoints"):
        state = import_tsm_checkpoint(bi_checkpoint, model)
    assert set(state) == set(model.state_dict())  # it loads: converting after loading is legitimate
    assert "no temporal shift" in caplog.text and "direction='bi'" in caplog.text


def test_convert_takes_the_online_checkpoints_slot(capsys, online_checkpoint):
    base = ["convert", "torchvision:mobilenet_v2", "--num-classes", "27", "--direction", "uni",
            "--checkpoint", online_checkpoint]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "uni_slot='first'" in err and "warning" not in err
    assert main(base + ["--uni-slot", "past"]) == 0
    assert "warning:" in capsys.readouterr().err

import subprocess
import sys

import pytest
import torch

import tsm_surgery
from tsm_surgery.cli import VERBS, main


def test_convert_prints_table_and_saves(tmp_path, capsys):
    out, graph = tmp_path / "net.pt", tmp_path / "graph.py"
    assert main(["convert", "timm:resnet18", "--n-segments", "4", "--direction", "uni",
                 "--out", str(out), "--graph", str(graph)]) == 0
    printed = capsys.readouterr().out
    assert "layer4.1" in printed and "8 sites shifted (uni" in printed
    net = torch.load(out, weights_only=False)
    assert isinstance(net, tsm_surgery.TSMNet) and net.n_segments == 4 and net.direction == "uni"
    assert "temporal_shifts" in graph.read_text()


def test_unknown_model_names_close_matches(capsys):
    assert main(["convert", "timm:resnet1800"]) == 1
    err = capsys.readouterr().err
    assert "resnet18" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="resnet18"):  # --debug: the exception itself, with its traceback
        main(["--debug", "convert", "timm:resnet1800"])


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "tsm_surgery.cli", "convert", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--n-segments" in result.stdout


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"tsm-surgery {verb}" in capsys.readouterr().out


def _one_line_error(capsys, argv, *needles):
    """The CLI contract: exit 1, one line on stderr naming the file or flag, no traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_checkpoints_get_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    whole = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), whole)
    (tmp_path / "cut.pth").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cases = {"empty.pth": "is empty", "notes.pth": "not a PyTorch checkpoint", "list.pth": "holds a list",
             "cut.pth": "truncated", "missing.pth": "does not exist"}
    for name, needle in cases.items():
        err = _one_line_error(capsys, ["convert", "timm:resnet18", "--checkpoint", str(tmp_path / name)], name, needle)
        assert "weights_only=False" not in err and "--resume" not in err
    _one_line_error(capsys, ["import-checkpoint", str(tmp_path / "empty.pth"), str(tmp_path / "out.pth")],
                    "empty.pth", "is empty")  # the same reader for every verb
    with pytest.raises(Exception, match="is empty"):  # --debug: the exception itself, with its traceback
        main(["convert", "timm:resnet18", "--checkpoint", str(tmp_path / "empty.pth"), "--debug"])


def test_a_video_given_as_checkpoint(tmp_path, capsys):
    pytest.importorskip("av")
    from tsm_surgery.integrations.demo.synth_data import write_video

    video = tmp_path / "clip.mp4"
    write_video(video, torch.zeros(8, 32, 32, 3, dtype=torch.uint8).numpy())
    _one_line_error(capsys, ["convert", "timm:resnet18", "--checkpoint", str(video)], "clip.mp4",
                    "not a PyTorch checkpoint")


def test_mismatching_checkpoint_one_strict_message(tmp_path, capsys):
    import timm

    other = tmp_path / "r18_10.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), other)
    err = _one_line_error(capsys, ["convert", "timm:resnet18", "--checkpoint", str(other)], "r18_10.pth",
                          "does not match the model", "fc.weight", "--num-classes")
    assert "2 have other shapes" in err


def test_convert_checkpoint_loads_the_weights(tmp_path, monkeypatch):
    import timm

    from tsm_surgery.integrations.checkpoints import loading

    model = timm.create_model("resnet18", num_classes=1000)
    ckpt, out = tmp_path / "w.pth", tmp_path / "net.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
    reads = []
    monkeypatch.setattr(loading, "_load", lambda path, *a, _load=loading._load: reads.append(path) or _load(path, *a))
    assert main(["convert", "timm:resnet18", "--n-segments", "2", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert reads == [str(ckpt)] * 2  # the strict load, then one read for the shift and layout checks
    net = torch.load(out, weights_only=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in model.state_dict().items())


def test_convert_refuses_existing_outputs(tmp_path, capsys):
    out, graph = tmp_path / "net.pt", tmp_path / "graph.py"
    graph.write_text("mine")
    err = _one_line_error(capsys, ["convert", "timm:resnet18", "--out", str(out), "--graph", str(graph)],
                          "graph.py already exists", str(out), "--force")
    assert graph.read_text() == "mine" and not out.exists()
    _one_line_error(capsys, ["convert", "timm:resnet18", "--out", str(out), "--graph", str(out)], "written twice")
    assert main(["convert", "timm:resnet18", "--n-segments", "2", "--out", str(out), "--graph", str(graph),
                 "--force"]) == 0
    assert "temporal_shifts" in graph.read_text() and out.exists()
    assert "belong together" in err


@pytest.mark.parametrize("argv, flag", [(["stream", "v.mp4", "--model", "timm:resnet18", "--size", "0"], "--size"),
                                        (["convert", "timm:resnet18", "--n-segments", "0"], "--n-segments"),
                                        (["export", "--model", "timm:resnet18", "--batch-size", "-1"], "--batch-size")])
def test_non_positive_sizes_are_rejected(argv, flag, capsys):
    _one_line_error(capsys, argv, flag)


def test_synth_data_bad_seed_writes_nothing(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["synth-data", str(out), "--seed", "-1", "--videos-per-class", "3"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "--seed -1" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not out.exists()


def test_broken_videos_are_named(tmp_path, capsys):
    pytest.importorskip("av")
    import numpy as np

    from tsm_surgery.integrations.demo.synth_data import render_video, sample_params, write_video

    video = tmp_path / "good.mp4"
    write_video(video, render_video(sample_params(0, np.random.default_rng(0), 32, 16)))
    data = video.read_bytes()
    moov = data.rindex(b"moov")
    (tmp_path / "truncated.mp4").write_bytes(data[:moov + (len(data) - moov) // 4])  # a partial index (moov)
    middle = bytearray(data)
    middle[len(data) // 2: len(data) // 2 + 3000] = bytes(3000)
    (tmp_path / "corrupt.mp4").write_bytes(bytes(middle))
    argv = ["stream", "--model", "timm:resnet18", "--size", "32", "--quiet"]
    assert main(["stream", str(video)] + argv[1:]) == 0
    assert "16 frames" in capsys.readouterr().out
    for name in ("truncated.mp4", "corrupt.mp4"):
        _one_line_error(capsys, ["stream", str(tmp_path / name)] + argv[1:], name, "cannot decode")


@pytest.mark.parametrize("module", ["checkpoints.loading", "outputs"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"tsm_surgery.integrations.{module}"),
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0

"""The paper's online demo layout: its MobileNetV2 checkpoint streams through to_online, frame for frame.

The reference is the paper's published online forward (tests/paper_tsm.py): each shifting
block feeds its branch the previous frame's first ``c // 8`` channels from a cache and hands
this frame's first ``c // 8`` on. ``uni_slot='first'`` is that layout; the default
``uni_slot='past'`` moves ``[fold, 2*fold)`` and so gives other outputs with the same weights.
"""

import pytest
import torch
import torchvision
from paper_tsm import PaperMobileNetV2, calibrate_norms, online_buffers
from utils import randomize_norms

import tsm_surgery
from tsm_surgery.integrations.checkpoints import detect_layout, import_tsm_checkpoint

FRAMES, STREAMS, SIZE = 6, 2, 32


def _frames(streams):
    # Frames of different brightness and contrast: after global pooling, a frame's features
    # then differ from the previous frame's, so reading the wrong frame shows in the outputs.
    scale = torch.linspace(0.5, 3.0, FRAMES).view(FRAMES, 1, 1, 1, 1)
    return torch.randn(FRAMES, streams, 3, SIZE, SIZE) * scale + scale - 1


@pytest.fixture(scope="module")
def paper_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    paper = randomize_norms(PaperMobileNetV2(n_class=27, online=True))
    frames = torch.randn(8, 3, SIZE, SIZE)
    calibrate_norms(paper, frames, *online_buffers(paper, frames))
    path = tmp_path_factory.mktemp("paper") / "mobilenetv2_jester_online.pth.tar"
    torch.save(paper.state_dict(), path)  # the demo loads a bare state dict
    return paper, path


def _paper_stream(paper, frames):
    buffers, outputs = online_buffers(paper, frames[0]), []
    with torch.no_grad():
        for frame in frames:
            out, *buffers = paper(frame, *buffers)
            outputs.append(out)
    return torch.stack(outputs)


def _ours(path, uni_slot):
    net = tsm_surgery.convert(torchvision.models.mobilenet_v2(num_classes=27), n_segments=FRAMES,
                              direction="uni", uni_slot=uni_slot)
    net.load_state_dict(import_tsm_checkpoint(path, net))
    return net.eval()


def test_paper_online_checkpoint_streams_frame_for_frame(paper_checkpoint):
    paper, path = paper_checkpoint
    assert detect_layout(path).name == "paper-online"
    frames = _frames(STREAMS)
    expected = _paper_stream(paper, frames)
    net = _ours(path, "first")
    online = tsm_surgery.to_online(net)
    with torch.no_grad():
        got = torch.stack([online(frame) for frame in frames])
        # The offline uni network on the whole clip gives the same per-frame outputs.
        clips = frames.transpose(0, 1).reshape(STREAMS * FRAMES, 3, SIZE, SIZE)
        offline = net(clips).view(STREAMS, FRAMES, -1).transpose(0, 1)
    for t in range(FRAMES):
        diff = (got[t] - expected[t]).abs().max().item()
        print(f"frame {t}: max abs diff {diff:.3g}")
        assert diff <= 1e-5 * max(1.0, expected[t].abs().max().item()), (t, diff)
    torch.testing.assert_close(offline, expected, rtol=1e-5, atol=1e-5)
    # The cache matters: a stream that forgets it after every frame differs from frame 1 on.
    with torch.no_grad():
        forgetful = torch.stack([paper(f, *online_buffers(paper, f))[0] for f in frames])
    assert torch.equal(forgetful[0], expected[0])
    assert (forgetful[1:] - expected[1:]).abs().max() > 1e-2 * expected.abs().max()


def test_our_uni_slot_is_another_layout(paper_checkpoint, caplog):
    paper, path = paper_checkpoint
    frames = _frames(1)
    expected = _paper_stream(paper, frames)
    with caplog.at_level("WARNING", logger="tsm_surgery.integrations.checkpoints"):
        online = tsm_surgery.to_online(_ours(path, "past"))
    assert "uni_slot='first'" in caplog.text and "uni_slot='past'" in caplog.text
    with torch.no_grad():
        got = torch.stack([online(frame) for frame in frames])
    assert (got - expected).abs().max() > 1e-2 * expected.abs().max()


def test_stream_verb_runs_the_paper_online_checkpoint(paper_checkpoint, tmp_path, capsys):
    """`tsm-surgery stream --model torchvision:mobilenet_v2 --checkpoint <paper online> --uni-slot first`."""
    pytest.importorskip("av")
    from utils import write_video

    from tsm_surgery.cli import main

    paper, _ = paper_checkpoint
    state = {k: v.clone() for k, v in paper.state_dict().items()}
    state["classifier.bias"][13] = 60.0  # one class wins whatever the frame: the weights were loaded
    path = tmp_path / "mobilenetv2_jester_online.pth.tar"
    torch.save(state, path)
    video = str(tmp_path / "v.mp4")
    write_video(video, 1)
    argv = ["stream", video, "--model", "torchvision:mobilenet_v2", "--checkpoint", str(path), "--num-classes", "27",
            "--uni-slot", "first", "--size", "32", "--topk", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    frames = [line for line in captured.out.splitlines() if line.startswith("frame")]
    assert len(frames) == 8 and all("top-1: 13:1.000" in line for line in frames), frames
    assert "detected paper online-demo mobilenet_v2" in captured.err and "uni_slot='first'" in captured.err

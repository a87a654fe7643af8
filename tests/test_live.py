"""Live streams: real sources on 127.0.0.1 (MPEG-TS over TCP and UDP from a PyAV subprocess), many streams in
one batched step, post-processing, annotation, and bad sources that leave the other streams running."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import tsm_surgery
from tsm_surgery.cli import main

av = pytest.importorskip("av")

from live_server import frames as server_frames  # noqa: E402
from utils import TinyNet, randomize_norms  # noqa: E402

from tsm_surgery.integrations.demo.synth_data import write_video  # noqa: E402
from tsm_surgery.integrations.streaming.batch import StreamBatch  # noqa: E402
from tsm_surgery.integrations.streaming.engine import StepEngine, TorchEngine  # noqa: E402
from tsm_surgery.integrations.streaming.loop import FrameLoop  # noqa: E402
from tsm_surgery.integrations.streaming.post import Hysteresis, PostProcess  # noqa: E402
from tsm_surgery.integrations.streaming.sources import Source, redact  # noqa: E402
from tsm_surgery.integrations.streaming.stream import Preprocess  # noqa: E402

SERVER = os.path.join(os.path.dirname(__file__), "live_server.py")
MODEL = ["--model", "timm:test_resnet", "--num-classes", "4", "--size", "32", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Servers:
    def __init__(self):
        self.procs = []

    def start(self, proto, *args, wait=True):
        port = _free_port(socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
        proc = subprocess.Popen([sys.executable, SERVER, proto, str(port), *map(str, args)],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        if wait and proto == "tcp":
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.2)  # from "ready" to listening
        return f"{proto}://127.0.0.1:{port}"

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def servers():
    s = _Servers()
    yield s
    s.stop()


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _by_stream(records):
    out = {}
    for r in records:
        out.setdefault(r["stream"], []).append(r)
    return out


def _video(path, frames):
    write_video(path, frames)
    return str(path)


# ------------------------------------------------------------------------------------------- live sources


def test_tcp_and_udp_live_streams_run_beside_a_file(tmp_path, servers, capsys):
    tcp = servers.start("tcp", "--frames", 16, "--fps", 16)
    udp = servers.start("udp", "--frames", 16, "--fps", 16, "--delay", 0)
    clip = _video(tmp_path / "clip.mp4", server_frames(8, 5))
    out = tmp_path / "frames.jsonl"
    code = main(["stream", clip, tcp, udp, *MODEL, "--max-frames", "8", "--timeout", "10", "--quiet", "--warmup", "0",
                 "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    streams = _by_stream(_records(out))
    assert set(streams) == {clip, tcp, udp}
    assert [r["frame"] for r in streams[clip]] == list(range(8))  # a file is not read in real time: no drops
    assert all(r["lag_s"] is None for r in streams[clip])
    for url in (tcp, udp):  # live: read in real time, lag measured; dropped + processed = decoded
        assert streams[url] and all(r["lag_s"] is not None and r["lag_s"] >= 0 for r in streams[url])
        line = next(line for line in printed.out.splitlines() if line.startswith(url + ":"))
        assert "lag p50/p95/max" in line
        dropped = int(line.split(" frames dropped")[0].rsplit(" ", 1)[1]) if "dropped" in line else 0
        assert len(streams[url]) + dropped == 8, line


def test_a_server_that_disconnects_and_comes_back_resets_the_stream(tmp_path, servers, capsys):
    url = servers.start("tcp", "--frames", 6, "--fps", 24, "--connections", 2, "--pause", 0.5)
    out = tmp_path / "frames.jsonl"
    code = main(["stream", url, *MODEL, "--no-realtime", "--max-frames", "12", "--reconnect", "5", "--quiet",
                 "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "disconnected; reconnecting in" in err and "reconnected; the stream's state is reset" in err
    records = _records(out)
    assert [r["frame"] for r in records] == list(range(12))
    first, second = records[:6], records[6:]
    # The same video served twice and the state reset: the second connection gives the first one's outputs
    # (without the reset, frame 6 would read frame 5's cache).
    for a, b in zip(first, second):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        np.testing.assert_allclose([t["score"] for t in a["top"]], [t["score"] for t in b["top"]], atol=2e-6)


def test_two_live_streams_in_one_batch_equal_separate_runs(tmp_path, servers, capsys):
    from tsm_surgery.integrations.models import build_model

    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"  # every run streams the same weights
    torch.save(randomize_norms(build_model("timm:test_resnet", num_classes=4)).state_dict(), weights)

    def run(urls, name):
        out = tmp_path / name
        assert main(["stream", *urls, *MODEL, "--checkpoint", str(weights), "--no-realtime", "--max-frames", "8",
                     "--reconnect", "0",
                     "--quiet", "--topk", "4", "--json", str(out)]) == 0
        return _by_stream(_records(out))

    a, b = servers.start("tcp", "--frames", 8, "--seed", 1), servers.start("tcp", "--frames", 8, "--seed", 2)
    together = run([a, b], "both.jsonl")
    alone = {}
    for seed in (1, 2):
        url = servers.start("tcp", "--frames", 8, "--seed", seed)
        alone[seed] = run([url], f"alone{seed}.jsonl")[url]
    capsys.readouterr()
    for url, seed in ((a, 1), (b, 2)):
        assert len(together[url]) == len(alone[seed]) == 8
        for batched, single in zip(together[url], alone[seed]):
            scores = lambda r: {t["class"]: t["score"] for t in r["top"]}  # noqa: E731
            # Float tolerance: a batched convolution may sum in another order than a batch of one.
            np.testing.assert_allclose(*[[s[c] for c in range(4)] for s in (scores(batched), scores(single))],
                                       atol=1e-5)


# ------------------------------------------------------------------------------------------- Python API


def _tiny_online(size=32, classes=4, seed=0):
    torch.manual_seed(seed)
    model = TinyNet(width=16, classes=classes).eval()
    net = tsm_surgery.convert(model, n_segments=4, direction="uni", example_input=torch.zeros(1, 3, size, size))
    return tsm_surgery.to_online(net)


def test_stream_batch_api_equals_each_stream_alone():
    online = _tiny_online()
    engine = TorchEngine(online, (3, 32, 32))
    assert isinstance(engine, StepEngine)
    frames = {name: torch.randn(6, 1, 3, 32, 32) for name in "abc"}
    alone = {}
    for name, clip in frames.items():
        online.reset()
        with torch.no_grad():
            alone[name] = torch.cat([online(f) for f in clip])
    batch = StreamBatch(engine)
    ids = {"a": batch.add("a"), "b": batch.add("b")}
    got = {name: [] for name in frames}
    for t in range(9):
        if t == 3:  # a ends; c starts in the freed slot from the state before its first frame
            batch.remove(ids.pop("a"))
            ids["c"] = batch.add("c")
        for name, stream in ids.items():
            step = len(got[name])
            if step < 6 and not (name == "b" and t == 4):  # b has no frame at t=4: it waits, the others go on
                batch.feed(stream, frames[name][step])
        for stream, logits in batch.step().items():
            got[batch.names[stream]].append(logits)
    assert [len(got[n]) for n in "abc"] == [3, 6, 6]
    torch.testing.assert_close(torch.stack(got["a"]), alone["a"][:3], atol=1e-5, rtol=1e-5)
    for name in "bc":
        torch.testing.assert_close(torch.stack(got[name]), alone[name], atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="no stream"):
        batch.feed(ids.get("a", 99), frames["a"][0])


def _colour_model():
    """TinyNet whose logit c is 10 x the mean of normalised colour channel c (ReLU): the class is the colour."""
    model = TinyNet(width=16, classes=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for c in range(3):
            model.stem.weight[c, c, 1, 1] = 1.0
            model.head.weight[c, c] = 10.0
        for block in model.blocks:
            block[1].weight.fill_(1.0)
    return model


def test_hysteresis_events_on_a_clip_whose_class_changes_once(tmp_path):
    colours = [(230, 20, 20)] * 8 + [(20, 20, 230)] * 8  # red, then blue
    colours[3] = colours[4] = (20, 230, 20)  # a two-frame green blip: shorter than the hysteresis
    clip = np.array([np.full((32, 32, 3), c, np.uint8) for c in colours])
    path = _video(tmp_path / "change.mp4", clip)  # 8 fps
    net = tsm_surgery.convert(_colour_model(), n_segments=4, direction="uni",
                              example_input=torch.zeros(1, 3, 32, 32))
    batch = StreamBatch(TorchEngine(tsm_surgery.to_online(net), (3, 32, 32)))
    leaders, events = [], []

    def on_result(result):
        leaders.append(int(result.probs.argmax()))
        events.extend(result.events)

    loop = FrameLoop([Source(path)], batch, Preprocess(32),
                     lambda name: PostProcess(name, hysteresis=Hysteresis(3)), on_result,
                     lambda name, ended: events.extend(ended), say=lambda line: None)
    loop.run()
    assert leaders == [0, 0, 0, 1, 1, 0, 0, 0] + [2] * 8  # the network sees the blip
    got = [e.to_dict() for e in events]
    assert [e["class"] for e in got] == [0, 2], got  # the hysteresis does not announce it
    assert got[0]["start_s"] == 0 and got[0]["end_s"] == got[1]["start_s"] == 1.0  # frame 8 at 8 fps
    assert got[1]["end_s"] == 15 / 8
    assert 0.5 < got[0]["score"] < 1 and got[1]["score"] > 0.9


# ------------------------------------------------------------------------------------------- outputs


def test_annotated_video_shows_the_top_label_and_its_score_bar(tmp_path, capsys):
    from tsm_surgery.integrations.streaming.annotate import BAR_COLOUR, panel_geometry

    clip = _video(tmp_path / "clip.mp4", server_frames(6, 3, size=64))
    out, log = tmp_path / "annotated.mp4", tmp_path / "frames.jsonl"
    assert main(["stream", clip, *MODEL, "--topk", "2", "--smooth", "ema:0.5", "--annotate", str(out),
                 "--json", str(log), "--quiet"]) == 0
    capsys.readouterr()
    records = _records(log)
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert container.streams.video[0].average_rate == 8  # the source's rate (write_video's 8 fps)
    assert len(frames) == len(records) == 6
    width = frames[0].shape[1]
    geometry = panel_geometry(width, 2)
    top = frames[0].shape[0] - geometry["height"]
    assert top == width  # a square source scaled to the output width, the panel below
    for frame, record in zip(frames, records):
        for row, entry in enumerate(record["top"]):
            y = top + geometry["y_bar"](row) + geometry["bar_height"] // 2
            line = frame[y, geometry["x0"]:geometry["x1"]].astype(int)
            green = (np.abs(line - np.array(BAR_COLOUR)).max(axis=1) < 40).sum()
            assert abs(green - entry["score"] * (geometry["x1"] - geometry["x0"])) <= 3, (row, green, entry)
        text = frame[top + geometry["y_bar"](0):top + geometry["y_bar"](0) + geometry["bar_height"],
                     geometry["x_text"]:geometry["x0"] - 4]
        assert (text.min(axis=2) > 180).sum() > 10  # the label's light text is drawn


# ------------------------------------------------------------------------------------------- bad input


def test_bad_sources_get_one_line_each_and_the_others_run(tmp_path, servers, capsys):
    clip = _video(tmp_path / "clip.mp4", server_frames(6, 4))
    silent = servers.start("tcp", "--silent")
    refused = f"tcp://admin:s3cret@127.0.0.1:{_free_port()}"
    out = tmp_path / "frames.jsonl"
    code = main(["stream", clip, refused, "/dev/video97", silent, "rtsp://bob:hunter2@127.0.0.1:1/x", *MODEL,
                 "--timeout", "1", "--reconnect", "0", "--json", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4, err
    assert "s3cret" not in err and "hunter2" not in err and "admin" not in err and "tcp://***@127.0.0.1" in err
    assert any("/dev/video97 does not exist" in line for line in lines)
    assert any(silent in line and "cannot open" in line for line in lines)  # stalled: nothing within 1 s
    assert [r["frame"] for r in _records(out)] == list(range(6))  # the file ran to its end
    assert redact("rtsp://u:p@h/x and u:p again", "rtsp://u:p@h/x") == "rtsp://***@h/x and *** again"


def test_a_frame_size_change_is_said_once_and_rescaled(tmp_path, capsys):
    parts = []
    for i, size in enumerate((48, 32, 48)):
        part = tmp_path / f"part{i}.ts"
        with av.open(str(part), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=8)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for image in server_frames(3, i, size):
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    assert main(["stream", str(joined), *MODEL, "--quiet", "--warmup", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("frame size changed from 48x48 to 32x32") == 1, captured.err
    with av.open(str(joined)) as container:  # every frame FFmpeg decodes is streamed, at either size
        sizes = [(f.width, f.height) for f in container.decode(video=0)]
    assert {(32, 32), (48, 48)} == set(sizes) and f"{len(sizes)} frames in" in captured.out


def test_stream_verb_item17_checks(tmp_path, capsys):
    from test_cli import _one_line_error

    clip = _video(tmp_path / "clip.mp4", server_frames(3, 0))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    _one_line_error(capsys, ["stream", clip, *MODEL, "--labels", str(labels)], "has 3 names", "4 classes")
    labels.write_text("a\nb\nc\nd\n\n")  # a trailing blank line is not a class
    assert main(["stream", clip, *MODEL, "--labels", str(labels), "--topk", "1"]) == 0
    assert "top-1: " in capsys.readouterr().out
    _one_line_error(capsys, ["stream", clip, "--model", "timm:test_resnet", "--size", "30000"], "--size", "2048")
    assert main(["stream", clip, *MODEL, "--warmup", "10"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "no step timed after the 10 warm-up frames" in out
    assert main(["stream", clip, *MODEL, "--warmup", "2"]) == 0  # one timed frame: a latency, no rate
    assert "nan" not in capsys.readouterr().out


def test_preprocess_crops_before_it_resizes():
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (2, 2000, 3), dtype=np.uint8)  # resizing it whole to 224 high would take 1.5 GB
    got = Preprocess(224)(wide)
    crop = torch.from_numpy(wide[:, 999:1001].copy()).permute(2, 0, 1)[None].float() / 255
    expected = F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(got, (expected - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    with pytest.raises(ValueError, match="2048"):
        Preprocess(30000)


@pytest.mark.parametrize("module", ["post", "sources"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"tsm_surgery.integrations.streaming.{module}"),
                             extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


def _drain(source, timeout=20.0):
    """Waits for the source to end, then returns its frames' indices and its messages."""
    items, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if source._thread is not None and not source._thread.is_alive():
            break
    while (item := source.next_item()) is not None:
        items.append(item)
    return [i.index for i in items if hasattr(i, "index")], [i.kind for i in items if hasattr(i, "kind")]


def test_real_time_drop_policies_on_a_paced_file(tmp_path):
    clip = _video(tmp_path / "clip.mp4", server_frames(8, 0))  # 8 frames at 8 fps: paced, 1 s
    began = time.perf_counter()
    oldest = Source(clip, realtime=True, buffer=1).start()  # nobody reads until the end: only the newest is left
    assert _drain(oldest) == ([7], ["end"]) and oldest.dropped == 7
    assert time.perf_counter() - began > 0.8  # read at the file's own rate
    every = Source(clip, realtime=True, drop="every-k", every=3, buffer=8).start()
    assert _drain(every) == ([0, 3, 6], ["end"]) and every.dropped == 5
    assert _drain(Source(clip, buffer=8).start()) == (list(range(8)), ["end"])  # not real time: nothing dropped


# ------------------------------------------------------------------------------------------- --engine


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_stream_engine_onnx_equals_stream_model(tmp_path, capsys, int8):
    """``stream --engine onnx SIDECAR`` streams an export as ``stream --model`` streams its weights.

    float32: equal within float tolerance. int8 (calibrated on the same demo frames): the
    logits follow float32's within a tenth of their range, the class ranking on most frames.
    """
    pytest.importorskip("onnxruntime")
    from tsm_surgery.integrations.models import build_model

    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"
    torch.save(randomize_norms(build_model("timm:test_resnet", num_classes=4)).state_dict(), weights)
    model = ["--model", "timm:test_resnet", "--num-classes", "4", "--size", "32", "--checkpoint", str(weights)]
    sidecar = tmp_path / "step.json"
    quant = ["--int8", "--calibration", str(tmp_path / "videos")] if int8 else []
    if int8:
        os.makedirs(tmp_path / "videos")
        for seed in range(3):
            _video(tmp_path / "videos" / f"v{seed}.mp4", server_frames(8, seed, size=48))
    assert main(["export", "--target", "onnx", *model, *quant, "--output", str(tmp_path / "step.onnx")]) == 0
    clip = _video(tmp_path / "clip.mp4", server_frames(10, 5, size=48))

    def scores(argv, name):
        out = tmp_path / name
        assert main(["stream", *argv, "--quiet", "--topk", "4", "--warmup", "0", "--json", str(out)]) == 0
        return np.array([[{t["class"]: t["score"] for t in r["top"]}[c] for c in range(4)] for r in _records(out)])

    runtime = scores(["--engine", "onnx", str(sidecar), clip], "engine.jsonl")
    torch_run = scores([clip, *model, "--threads", "1"], "model.jsonl")
    capsys.readouterr()
    assert runtime.shape == torch_run.shape == (10, 4)
    if not int8:
        np.testing.assert_allclose(runtime, torch_run, atol=1e-4)  # probabilities, rounded to 1e-6 in the JSON
        return
    assert np.abs(runtime - torch_run).max() < 0.1
    assert np.mean(runtime.argmax(1) == torch_run.argmax(1)) >= 0.7


def test_stream_engine_bad_input_is_one_line(tmp_path, capsys):
    clip = _video(tmp_path / "clip.mp4", server_frames(4, 1, size=32))
    for argv, word in ((["--engine", "onnx", clip], "sidecar"),
                       (["--engine", "onnx", str(tmp_path / "none.json"), clip], "no such sidecar"),
                       (["--engine", "onnx", str(tmp_path / "none.json"), clip, "--size", "32"], "--size"),
                       ([clip], "--engine")):
        assert main(["stream", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("tsm-surgery stream: ") and word in err, err

"""The online (streaming) form: equal to the offline uni network on every prefix, state handling,
errors, copies, the stream verb."""

import doctest
import re

import numpy as np
import pytest
import torch
from utils import randomize_norms

import tsm_surgery
from tsm_surgery import OnlineTSM, _online, _online_graph, to_online
from tsm_surgery.integrations.models import build_model

# torchvision RegNetY: in-place ReLU, squeeze-excitation and grouped convolutions in the branch.
MODELS = ["timm:resnet18", "timm:mobilenetv2_100", "timm:efficientnet_b0", "timm:convnext_atto",
          "torchvision:regnet_y_400mf"]
SIZE = 64
FRAMES = 5
RTOL = 1e-5


def _model(spec="timm:resnet18", classes=7):
    return randomize_norms(build_model(spec, num_classes=classes)).eval()


def _uni(spec="timm:resnet18", segments=FRAMES):
    model = _model(spec)
    return model, tsm_surgery.convert(model, n_segments=segments, direction="uni").eval()


def _offline_prefix(net, clips, t):
    """The offline uni network on frames 0..t of each clip; its output at frame t."""
    n = clips.shape[0]
    net.n_segments = t + 1
    out = net(clips[:, :t + 1].reshape((-1,) + clips.shape[2:]))
    return out.view(n, t + 1, -1)[:, t]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("spec", MODELS)
@torch.no_grad()
def test_online_equals_offline_uni_on_every_prefix(spec):
    model, net = _uni(spec)
    online = to_online(net)
    clips = torch.randn(2, FRAMES, 3, SIZE, SIZE)
    outs = [online(clips[:, t]) for t in range(FRAMES)]
    for t in range(FRAMES):
        reference = _offline_prefix(net, clips, t)
        assert _rel(outs[t], reference) <= RTOL, (spec, t)
    # The shift must matter: the last frame's output is not the 2D model's on that frame, by
    # far more than the tolerance (efficientnet_b0 is the closest, about 3e-4 relative).
    plain = model(clips[:, -1])
    assert _rel(outs[-1], plain) > 10 * RTOL


def _swapped_sites(online):
    return sum(n.op == "call_function" and n.target is _online_graph._restore_slot for n in online.graph.nodes)


@pytest.mark.parametrize("spec", ["timm:resnet18", "timm:convnext_atto"])
def test_in_place_slot_swap_equals_the_copy(spec):
    # Without autograd each site writes the cache into its input, lets the branch's first layer
    # read it, and writes the slot back; with autograd it makes a shifted copy. Same numbers.
    _, net = _uni(spec)
    online = to_online(net)
    assert _swapped_sites(online) == len(net.sites)
    frames = torch.randn(FRAMES, 2, 3, SIZE, SIZE)
    with torch.no_grad():
        swapped = [online(frame) for frame in frames]
    online.reset()
    copied = [online(frame).detach() for frame in frames]  # grad mode on: the copy path
    for a, b in zip(swapped, copied):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class _TracedConv(torch.nn.Conv2d):
    """A conv wrapper with its own forward (as mmcv's): traced into, it becomes a F.conv2d node."""

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=self.padding)


class _Block(torch.nn.Module):
    """One residual block whose branch starts with ``first``."""

    def __init__(self, first):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.branch = torch.nn.Sequential(first, torch.nn.Conv2d(16, 16, 3, padding=1),
                                          torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, 16, 1))
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.branch(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("first, swapped", [
    (lambda: torch.nn.ReLU(), 0),  # not a layer that only reads: the copy stays
    (lambda: torch.nn.ReLU(inplace=True), 1),  # writes the block input: on the trunk, the conv reads the shift
    (lambda: _TracedConv(16, 16, 3, padding=1), 1),  # a traced F.conv2d reads it: swapped
])
@torch.no_grad()
def test_slot_swap_only_before_layers_that_just_read(first, swapped):
    model = randomize_norms(_Block(first())).eval()
    net = tsm_surgery.convert(model, n_segments=FRAMES, direction="uni",
                              example_input=torch.randn(FRAMES, 3, 8, 8)).eval()
    online = to_online(net)
    assert _swapped_sites(online) == swapped
    clips = torch.randn(2, FRAMES, 3, 8, 8)
    outs = [online(clips[:, t]) for t in range(FRAMES)]
    for t in range(FRAMES):
        assert _rel(outs[t], _offline_prefix(net, clips, t)) <= RTOL


@torch.no_grad()
def test_explicit_step_equals_internal_state_and_is_pure():
    _, net = _uni()
    online = to_online(net)
    clips = torch.randn(3, 4, 3, SIZE, SIZE)
    state = online.init_state(3, frame_shape=(3, SIZE, SIZE))
    assert list(state) == online.state_names == [s.name for s in net.sites]
    for t in range(4):
        before = {k: v.clone() for k, v in state.items()}
        out, new_state = online.step(clips[:, t], state)
        assert all(torch.equal(state[k], before[k]) for k in state)  # the input state is untouched
        internal = online(clips[:, t])
        torch.testing.assert_close(out, internal, rtol=0, atol=0)
        for k in state:
            torch.testing.assert_close(new_state[k], online.state[k], rtol=0, atol=0)
        state = new_state


@torch.no_grad()
def test_cache_is_the_past_slot_of_each_site():
    """Checked against hooks on the offline network: the cache after frame t is [fold, 2*fold) of the site input."""
    _, net = _uni(segments=1)
    online = to_online(net)
    frame = torch.randn(2, 3, SIZE, SIZE)
    seen = {}
    for name, shift in net.shift_modules().items():
        shift.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0]))
    net(frame)
    _, state = online.step(frame, online.init_state(2, frame_shape=(3, SIZE, SIZE)))
    for site in net.sites:
        fold = site.channels // net.shift_div
        expected = seen[site.name].narrow(site.channel_dim, fold, fold)
        torch.testing.assert_close(state[site.name], expected, rtol=0, atol=0)
    # init_state's shapes, from the sites convert saw (224x224 example) and from a probe frame.
    default = online.init_state(1)
    assert [tuple(default[s.name].shape) for s in net.sites] == [
        (1, s.channels // 8) + tuple(s.shape[2:]) for s in net.sites]


@torch.no_grad()
def test_reset_all_and_reset_with_mask():
    _, net = _uni()
    online = to_online(net)
    a = torch.randn(2, FRAMES, 3, SIZE, SIZE)
    b = torch.randn(2, FRAMES, 3, SIZE, SIZE)
    for t in range(2):
        online(a[:, t])
    online.reset()  # every stream starts again: b is seen from its first frame
    for t in range(2):
        torch.testing.assert_close(online(b[:, t]), _offline_prefix(net, b, t), rtol=RTOL, atol=1e-6)
    # Stream 0 switches to video c at frame 2; stream 1 goes on with b.
    c = torch.randn(1, FRAMES, 3, SIZE, SIZE)
    online.reset(torch.tensor([True, False]))
    for t in range(2, FRAMES):
        out = online(torch.cat([c[:, t - 2], b[1:, t]]))
        torch.testing.assert_close(out[:1], _offline_prefix(net, c, t - 2), rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(out[1:], _offline_prefix(net, b[1:], t), rtol=RTOL, atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        online.reset(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="boolean"):
        online.reset(torch.tensor([1, 0]))
    online.reset()
    assert online.state is None
    online.reset(torch.tensor([True]))  # nothing running: a no-op


@torch.no_grad()
def test_convert_online_shortcut():
    model = _model()
    online = tsm_surgery.convert(model, n_segments=4, direction="uni", online=True)
    assert isinstance(online, OnlineTSM) and not online.training
    reference = to_online(tsm_surgery.convert(model, n_segments=4, direction="uni"))
    frames = torch.randn(3, 1, 3, SIZE, SIZE)
    for frame in frames:
        torch.testing.assert_close(online(frame), reference(frame), rtol=0, atol=0)
    with pytest.raises(ValueError, match="uni"):
        tsm_surgery.convert(model, n_segments=4, online=True)


def test_bi_network_is_refused_with_a_hint():
    net = tsm_surgery.convert(_model(), n_segments=4)
    with pytest.raises(ValueError, match=r"future|t\+1") as err:
        to_online(net)
    assert "direction='uni'" in str(err.value)
    with pytest.raises(TypeError, match="convert"):
        to_online(_model())


@torch.no_grad()
def test_mid_stream_input_changes_raise_naming_both():
    _, net = _uni()
    online = to_online(net)
    online(torch.randn(2, 3, SIZE, SIZE))
    bad = {
        "batch": torch.randn(3, 3, SIZE, SIZE),
        "size": torch.randn(2, 3, SIZE + 32, SIZE + 32),
        "dtype": torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64),
        "device": torch.randn(2, 3, SIZE, SIZE, device="meta"),
    }
    for what, frame in bad.items():
        with pytest.raises(ValueError) as err:
            online(frame)
        message = str(err.value)
        assert "(2, 3, 64, 64)" in message and "float32 on cpu" in message, what
        assert str(tuple(frame.shape)) in message and "reset()" in message, what
    online(torch.randn(2, 3, SIZE, SIZE))  # the stream itself is intact after the refusals
    online.reset()
    assert online(torch.randn(3, 3, SIZE + 32, SIZE + 32)).shape == (3, 7)  # new streams may differ


@torch.no_grad()
def test_explicit_state_mismatch_errors():
    _, net = _uni()
    online = to_online(net)
    frames = torch.randn(2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"batch 2 .* 1 stream"):
        online.step(frames, online.init_state(1, frame_shape=(3, SIZE, SIZE)))
    with pytest.raises(ValueError, match=r"site 'layer1.0': the cache is shape \(2, 8, 8, 8\)") as err:
        online.step(frames, online.init_state(2, frame_shape=(3, 32, 32)))
    assert "(2, 8, 16, 16)" in str(err.value)
    with pytest.raises(ValueError, match="float64"):
        online.step(frames, online.init_state(2, dtype=torch.float64, frame_shape=(3, SIZE, SIZE)))
    state = online.init_state(2, frame_shape=(3, SIZE, SIZE))
    del state["layer2.0"]
    with pytest.raises(ValueError, match="lacks the sites"):
        online.step(frames, state)
    with pytest.raises(ValueError, match="frame_shape"):
        online.init_state(1, frame_shape=(3, 2, 2, 2))


def test_state_dict_keys_dtype_and_no_graph_growth():
    model, net = _uni()
    online = to_online(net)
    assert list(online.state_dict()) == list(model.state_dict())
    assert sum(p.numel() for p in online.parameters()) == sum(p.numel() for p in model.parameters())
    # to_online copies by default: the offline network is untouched and independent.
    with torch.no_grad():
        next(iter(online.parameters())).add_(1.0)
    assert not torch.equal(next(iter(online.parameters())), next(iter(net.parameters())))
    # Internal state is detached: a long stream does not keep every frame's autograd graph.
    out = online(torch.randn(1, 3, SIZE, SIZE, requires_grad=True))
    assert out.requires_grad and all(not v.requires_grad for v in online.state.values())
    # The explicit form keeps the graph, so gradients flow through time.
    x0 = torch.randn(1, 3, SIZE, SIZE, requires_grad=True)
    _, state = online.step(x0, online.init_state(1, frame_shape=(3, SIZE, SIZE)))
    out, _ = online.step(torch.randn(1, 3, SIZE, SIZE), state)
    out.sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0


@torch.no_grad()
def test_dtype_and_module_conversion_reach_the_step():
    """.double() on the online module changes the parameters its step graph uses."""
    _, net = _uni(segments=3)
    online = to_online(net).double()
    clips = torch.randn(1, 3, 3, SIZE, SIZE, dtype=torch.float64)
    outs = [online(clips[:, t]) for t in range(3)]
    net.double()
    for t in range(3):
        torch.testing.assert_close(outs[t], _offline_prefix(net, clips, t), rtol=1e-10, atol=1e-12)
    assert online.init_state(1).popitem()[1].dtype == torch.float64


@torch.no_grad()
def test_deepcopy_and_pickle_keep_the_stream_computation(tmp_path):
    import copy

    _, net = _uni()
    online = to_online(net)
    torch.save(online, tmp_path / "online.pt")
    copies = [copy.deepcopy(online), torch.load(tmp_path / "online.pt", weights_only=False)]
    frames = torch.randn(3, 1, 3, SIZE, SIZE)
    expected = [online(f) for f in frames]
    for other in copies:
        assert list(other.state_dict()) == list(online.state_dict()) and not other.training
        for f, e in zip(frames, expected):
            torch.testing.assert_close(other(f), e, rtol=0, atol=0)
        other.reset()
        other.double()  # the copy's step graph runs on the copy's own (converted) parameters
        assert other(frames[0].double()).dtype == torch.float64


def test_docstring_examples():
    import torchvision

    online = to_online(tsm_surgery.convert(torchvision.models.resnet18(), n_segments=8, direction="uni"))
    for module in (_online, _online_graph):
        result = doctest.testmod(module, extraglobs={"tsm_surgery": tsm_surgery, "online": online},
                                 optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------- stream verb

from tsm_surgery.integrations.demo.synth_data import write_video  # noqa: E402


@torch.no_grad()
def test_stream_verb_prints_the_offline_networks_topk(tmp_path, capsys):
    from tsm_surgery.cli import main
    from tsm_surgery.integrations.streaming.stream import Preprocess, decode

    rng = np.random.default_rng(0)
    video = tmp_path / "clip.mp4"
    write_video(video, rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8))
    model = _model("timm:mobilenetv2_100", classes=5)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    code = main(["stream", str(video), "--model", "timm:mobilenetv2_100", "--checkpoint", str(tmp_path / "weights.pth"),
                 "--num-classes", "5", "--size", "48", "--topk", "2", "--benchmark", "--warmup", "1"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    frame_lines = [line for line in lines if line.startswith("frame ")]
    assert len(frame_lines) == 6
    # Independent computation: decode again, run the offline uni network on each prefix.
    clip = torch.cat([Preprocess(48)(f) for f in decode(str(video))])[None]
    net = tsm_surgery.convert(model, n_segments=6, direction="uni").eval()
    for t, line in enumerate(frame_lines):
        probs = _offline_prefix(net, clip, t).softmax(-1)[0]
        values, classes = probs.topk(2)
        printed = re.findall(r"(\d+):([\d.]+)", line.split("top-2:")[1])
        assert [int(c) for c, _ in printed] == classes.tolist()
        np.testing.assert_allclose([float(v) for _, v in printed], values.numpy(), atol=1e-3)
    summary = "\n".join(lines)
    assert "frames/s" in summary
    ratio = re.search(r"median paired ratio online/2D = ([\d.]+)", summary)
    assert ratio and float(ratio.group(1)) > 0


def test_stream_verb_errors(tmp_path, capsys):
    from tsm_surgery.cli import main

    empty = tmp_path / "missing.mp4"
    assert main(["stream", str(empty), "--model", "timm:resnet18", "--size", "32"]) == 1
    assert "missing.mp4" in capsys.readouterr().err
    assert main(["stream", str(empty)]) == 1  # --model or --config is required
    assert "--model" in capsys.readouterr().err


MMACTION_CONFIG = """
default_scope = 'mmaction'
custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)
model = dict(
    type='Recognizer2D',
    backbone=dict(type='TSMSurgeryBackbone', backbone=dict(type='timm.resnet18'), num_segments=4,
                  direction='uni', example_input_size=48),
    cls_head=dict(type='TSMHead', num_classes=5, in_channels=512, num_segments=4, spatial_type='avg',
                  consensus=dict(type='AvgConsensus', dim=1), dropout_ratio=0.5, is_shift=True,
                  average_clips='prob'),
    data_preprocessor=dict(type='ActionDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], format_shape='NCHW'))
"""


@pytest.mark.slow  # importing MMAction2 alone takes tens of seconds here
@torch.no_grad()
def test_stream_verb_with_an_mmaction_config(tmp_path, capsys):
    pytest.importorskip("mmaction")
    from mmaction.apis import init_recognizer

    import tsm_surgery.integrations.mmaction  # noqa: F401
    from tsm_surgery.cli import main
    from tsm_surgery.integrations.streaming.stream import Preprocess, decode

    config = tmp_path / "tsm_uni.py"
    config.write_text(MMACTION_CONFIG)
    recognizer = init_recognizer(str(config), None, device="cpu")
    randomize_norms(recognizer)
    torch.save({"state_dict": recognizer.state_dict()}, tmp_path / "ckpt.pth")
    video = tmp_path / "clip.mp4"
    write_video(video, np.random.default_rng(1).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8))
    assert main(["stream", str(video), "--config", str(config), "--checkpoint", str(tmp_path / "ckpt.pth"),
                 "--size", "48", "--topk", "1"]) == 0
    frame_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("frame ")]
    assert len(frame_lines) == 4
    recognizer.eval()
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    clip = torch.cat([Preprocess(48, mean, std, scale=1.0)(f) for f in decode(str(video))])
    for t, line in enumerate(frame_lines):
        recognizer.backbone.num_segments = t + 1
        features = recognizer.backbone(clip[:t + 1])[t:t + 1]
        recognizer.cls_head.num_segments = 1  # TSMHead reshapes by its own num_segments
        probs = recognizer.cls_head(features, num_segs=1).softmax(-1)[0]
        printed = re.search(r"top-1: (\d+):([\d.]+)", line)
        assert int(printed.group(1)) == int(probs.argmax())
        assert abs(float(printed.group(2)) - float(probs.max())) < 1e-3


@pytest.mark.parametrize("grad", [False, True], ids=["swap", "copy"])
def test_first_slot_online_equals_offline_on_every_prefix(grad):
    # uni_slot="first": channels [0, fold) come from frame t-1 (the paper's online demo layout);
    # without autograd most sites swap the slot in place, with autograd every site copies.
    model = _model()
    net = tsm_surgery.convert(model, n_segments=FRAMES, direction="uni", uni_slot="first").eval()
    online = to_online(net)
    assert all(m.uni_slot == "first" for m in online.online_shifts.values())
    clips = torch.randn(2, FRAMES, 3, SIZE, SIZE)
    with torch.set_grad_enabled(grad):
        outs = [online(clips[:, t]) for t in range(FRAMES)]
    with torch.no_grad():
        for t in range(FRAMES):
            assert _rel(outs[t], _offline_prefix(net, clips, t)) <= RTOL, t
        past = tsm_surgery.convert(model, n_segments=FRAMES, direction="uni").eval()
        assert _rel(outs[-1], _offline_prefix(past, clips, FRAMES - 1)) > 10 * RTOL  # the slot matters


class _PaperBlock(torch.nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
                                          torch.nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.branch(x)


def _paper_online_shift(x, buffer, div=8):
    """The paper's online demo shift (mit-han-lab online_demo, MobileNetV2): the first C//div
    channels are cached and fed back at the next frame."""
    c = x.size(1)
    x1, x2 = x[:, : c // div], x[:, c // div:]
    return torch.cat((buffer, x2), dim=1), x1


@torch.no_grad()
def test_first_slot_streams_as_the_papers_online_demo():
    model = _paper_model()
    online = tsm_surgery.convert(model, 4, direction="uni", uni_slot="first", online=True,
                                 example_input=torch.randn(1, 3, 8, 8))
    frames = torch.randn(6, 2, 3, 8, 8)
    buffers = [torch.zeros(2, 2, 8, 8) for _ in range(2)]
    for frame in frames:
        h = model[0](frame)
        for k, block in enumerate((model[1], model[2])):
            shifted, buffers[k] = _paper_online_shift(h, buffers[k])
            h = h + block.branch(shifted)
        reference = model[5](model[4](model[3](h)))
        torch.testing.assert_close(online(frame), reference, rtol=1e-5, atol=1e-6)


def test_copies_made_mid_stream_continue_the_stream(tmp_path):
    import copy
    import pickle

    _, net = _uni()
    online = to_online(net)
    frames = torch.randn(5, 2, 3, SIZE, SIZE)
    with torch.no_grad():
        for f in frames[:2]:
            online(f)
        copies = [copy.deepcopy(online), pickle.loads(pickle.dumps(online))]
        torch.save(online, tmp_path / "online.pt")
        copies.append(torch.load(tmp_path / "online.pt", weights_only=False))
        expected = [online(f) for f in frames[2:]]
        for other in copies:
            assert other.state is not online.state
            for f, e in zip(frames[2:], expected):
                torch.testing.assert_close(other(f), e, rtol=0, atol=0)


def test_train_mode_is_refused():
    _, net = _uni()
    online = to_online(net)
    with pytest.raises(RuntimeError, match="eval mode only.*to_online"):
        online.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        torch.nn.Sequential(online).train()
    assert not online.training and not any(m.training for m in online.modules())
    assert online.eval() is online and online.train(False) is online


def _paper_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _PaperBlock(), _PaperBlock(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()


@torch.no_grad()
def test_first_slot_exports_with_torch_export_and_onnx(tmp_path):
    online = tsm_surgery.convert(_paper_model(), 4, direction="uni", uni_slot="first", online=True,
                                 example_input=torch.randn(1, 3, 8, 8))
    frames = torch.randn(4, 1, 3, 8, 8)
    state = online.init_state(1)
    program = torch.export.export(online.step_module, (frames[0], *state.values())).module()
    expected, exported_state = [], list(state.values())
    for frame in frames:
        results = program(frame, *exported_state)
        exported_state = list(results[1:])
        out, state = online.step(frame, state)
        torch.testing.assert_close(results[0], out, rtol=1e-5, atol=1e-6)
        expected.append(out)
    ort = pytest.importorskip("onnxruntime")
    export = pytest.importorskip("tsm_surgery.integrations.export")
    sidecar = export.export_online(online, str(tmp_path / "step.onnx"), frame_shape=(3, 8, 8), exporter="legacy")
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    caches = {s["input"]: np.zeros(s["shape"], np.float32) for s in sidecar["state"]}
    for frame, out in zip(frames, expected):
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(None, {"frames": frame.numpy(), **caches})))
        np.testing.assert_allclose(results["output"], out.numpy(), rtol=1e-4, atol=1e-5)
        caches = {s["input"]: results[s["output"]] for s in sidecar["state"]}

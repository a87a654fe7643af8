"""Mixed precision on CPU: the shift, the online caches and the explicit-state step keep the activation's dtype.

Every low-precision result is compared with a float32 reference computed in the same test; the
shift itself moves data only, so on a low-precision tensor it must equal the float32 shift cast.
"""

import numpy as np
import pytest
import torch
from torch import nn
from utils import TinyNet, randomize_norms

import tsm_surgery
from tsm_surgery import temporal_shift, to_online

SEGMENTS = 4
LOW = [torch.bfloat16, torch.float16]


def _uni(segments=SEGMENTS):
    return tsm_surgery.convert(randomize_norms(TinyNet()), segments, direction="uni").eval()


def _offline_last(net, clips):
    """The offline uni network on whole clips ``(N, T, C, H, W)``: its output at the last frame."""
    n, t = clips.shape[:2]
    net.n_segments = t
    return net(clips.reshape((-1,) + clips.shape[2:])).view(n, t, -1)[:, -1]


def _close(low, reference, rel=0.05):
    """Low-precision outputs against the float32 reference: within ``rel`` of its largest value."""
    err = (low.float() - reference).abs().max().item()
    assert err <= rel * reference.abs().max().item(), err


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens"])
def test_shift_keeps_dtype_and_moves_the_same_entries(dtype, direction, layout):
    if layout == "tokens":
        x32, dim = torch.randn(2 * SEGMENTS, 5, 16), -1
    else:
        x32, dim = torch.randn(2 * SEGMENTS, 16, 3, 4), 1
        if layout == "channels_last":
            x32 = x32.contiguous(memory_format=torch.channels_last)
    x = x32.to(dtype).requires_grad_(True)
    out = temporal_shift(x, SEGMENTS, direction=direction, channel_dim=dim)
    assert out.dtype == dtype
    reference = temporal_shift(x.detach().float(), SEGMENTS, direction=direction, channel_dim=dim)
    assert torch.equal(out, reference.to(dtype))
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, grad)
    assert g.dtype == dtype
    # the gradient of a data move is the reverse move of the incoming gradient
    (g32,) = torch.autograd.grad(temporal_shift(x32.requires_grad_(True), SEGMENTS, 8, direction, dim), x32,
                                 grad.float())
    assert torch.equal(g, g32.to(dtype))


@pytest.mark.parametrize("dtype", LOW)
@torch.no_grad()
def test_online_in_a_low_precision_model_keeps_its_dtype(dtype):
    net = _uni()
    reference = net  # float32
    online = to_online(net).to(dtype)
    clips = torch.randn(2, SEGMENTS, 3, 16, 16)
    for t in range(SEGMENTS):
        out = online(clips[:, t].to(dtype))
        assert out.dtype == dtype and all(c.dtype == dtype for c in online.state.values())
        _close(out, _offline_last(reference, clips[:, :t + 1]))
    assert all(c.dtype == dtype for c in online.init_state(2).values())  # convert's example input size
    state = online.init_state(2, frame_shape=(3, 16, 16))
    assert all(c.dtype == dtype for c in state.values())
    out, state = online.step(clips[:, 0].to(dtype), state)
    assert out.dtype == dtype and all(c.dtype == dtype for c in state.values())


@torch.no_grad()
def test_online_under_bf16_autocast_matches_float32_and_resets_streams():
    net = _uni()
    online = to_online(net)
    clips = torch.randn(2, SEGMENTS, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [online(clips[:, t]) for t in range(SEGMENTS)]
        caches = dict(online.state)
        online.reset(torch.tensor([True, False]))  # stream 0 starts a new video
        restarted = online(clips[:, 0])
    assert all(c.dtype == torch.bfloat16 for c in caches.values())  # the activation's dtype under autocast
    for t, out in enumerate(outs):
        _close(out, _offline_last(net, clips[:, :t + 1]))
    _close(restarted[:1], _offline_last(net, clips[:1, :1]))  # stream 0 from its first frame
    expected = _offline_last(net, torch.cat([clips[1:], clips[1:, :1]], dim=1))  # stream 1 goes on
    _close(restarted[1:], expected)
    # float32 again after autocast: the streams restart with float32 caches
    online.reset()
    out = online(clips[:, 0])
    assert out.dtype == torch.float32 and all(c.dtype == torch.float32 for c in online.state.values())


@torch.no_grad()
def test_explicit_state_under_bf16_autocast():
    net = _uni()
    online = to_online(net)
    clips = torch.randn(1, SEGMENTS, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = online.init_state(1, frame_shape=(3, 16, 16))  # inside the region: the sites' autocast dtype
        assert all(c.dtype == torch.bfloat16 for c in state.values())
        for t in range(SEGMENTS):
            out, state = online.step(clips[:, t], state)
            _close(out, _offline_last(net, clips[:, :t + 1]))
        # A float32 state in a bf16 region is refused with the way out, not silently cast.
        with pytest.raises(ValueError, match="bfloat16.*init_state"):
            online.step(clips[:, 0], {k: v.float() for k, v in state.items()})
    float_state = online.init_state(1, frame_shape=(3, 16, 16))  # outside again: float32
    assert all(c.dtype == torch.float32 for c in float_state.values())


@pytest.mark.parametrize("dtype", LOW)
def test_converted_net_trains_under_autocast_with_float32_gradients(dtype):
    net = tsm_surgery.convert(randomize_norms(TinyNet()), SEGMENTS).train()
    reference = tsm_surgery.convert(randomize_norms(TinyNet()), SEGMENTS).train()
    reference.load_state_dict(net.state_dict())
    x = torch.randn(2 * SEGMENTS, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        low = net(x)
    assert low.dtype == dtype
    low.float().square().mean().backward()
    reference(x).square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    # All gradients at once: a conv bias before a batch norm has a gradient of about zero alone.
    low_grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    _close(low_grads, torch.cat([p.grad.flatten() for p in reference.parameters()]), rel=0.1)


def test_stream_verb_runs_in_bfloat16(tmp_path, capsys):
    av = pytest.importorskip("av")
    from tsm_surgery.cli import main

    video = tmp_path / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    args = ["stream", str(video), "--model", "torchvision:resnet18", "--num-classes", "3", "--size", "32",
            "--topk", "3"]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    low = _scores(capsys.readouterr().out)
    torch.manual_seed(0)
    assert main(args) == 0
    full = _scores(capsys.readouterr().out)
    assert len(low) == len(full) == 4
    for a, b in zip(low, full):  # the same random weights (seed 0 each run), bf16 against float32
        assert max(abs(a.get(k, 0) - v) for k, v in b.items()) < 0.05


def _scores(printed):
    """Per frame line, class -> probability."""
    lines = [line for line in printed.splitlines() if line.startswith("frame ")]
    return [{c: float(p) for c, p in (item.split(":") for item in line.split("top-3:")[1].split())}
            for line in lines]


def test_amp_config_builds_and_names_mmengines_amp_wrapper():
    pytest.importorskip("mmaction")
    import os

    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    import tsm_surgery.integrations.mmaction  # noqa: F401  (compat + registration)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = Config.fromfile(os.path.join(root, "configs", "tsm_surgery_r50_1x1x8_50e_kinetics400_amp.py"))
    wrapper = cfg.optim_wrapper
    assert wrapper.type == "AmpOptimWrapper" and wrapper.dtype == "float16"
    # the base config's optimizer and parameter groups are kept
    assert wrapper.constructor == "TSMSurgeryOptimWrapperConstructor" and wrapper.optimizer.type == "SGD"
    if not torch.cuda.is_available():  # mmengine 0.10.7 has no CPU AMP training (tests/test_cuda.py trains it)
        with pytest.raises(AssertionError, match="only available training on gpu"):
            build_optim_wrapper(nn.Linear(2, 2), dict(type="AmpOptimWrapper", dtype="bfloat16",
                                                      optimizer=dict(type="SGD", lr=0.1)))

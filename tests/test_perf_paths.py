"""The fast paths of the shift: custom autograd, recompute scope, torch.compile, autocast.

Behaviour only: no timing is asserted here (``tsm-surgery bench`` prints the ratios; its tests
are in test_bench.py).
"""

import copy
import math
import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from utils import randomize_norms

from tsm_surgery import TemporalShift, convert, temporal_shift
from tsm_surgery._recompute import recompute_shifts
from tsm_surgery._shift import _shift_frames

SEGMENTS = 4
LAYOUTS = ("contiguous", "channels_last", "tokens")


def make_input(layout, dtype=torch.float64, batch=2 * SEGMENTS):
    if layout == "tokens":
        return torch.randn(batch, 5, 16, dtype=dtype), -1
    x = torch.randn(batch, 16, 3, 4, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, 1


def reference(x, direction, channel_dim, shift_div=8):
    """The views + cat form the exporters see, on a contiguous copy."""
    x = x.contiguous()
    dim = channel_dim % x.dim()
    shape = list(x.shape)
    clips = x.reshape([shape[0] // SEGMENTS, SEGMENTS] + shape[1:])
    return _shift_frames(clips, dim + 1, shape[dim] // shift_div, direction).reshape(shape)


def graph_nodes(t):
    """Names of the autograd nodes behind ``t``."""
    names, stack = [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.append(type(node).__name__)
            stack.extend(fn for fn, _ in node.next_functions)
    return " ".join(names)


class Counter(TorchDispatchMode):
    """Records the ATen ops that run."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, out.shape if isinstance(out, torch.Tensor) else None))
        return out


class TinyResNet(nn.Module):
    """Two residual blocks: small enough to compile in seconds."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
            for _ in range(2))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_custom_autograd_gradcheck(direction, layout):
    x, dim = make_input(layout)
    x.requires_grad_(True)
    out = temporal_shift(x, SEGMENTS, direction=direction, channel_dim=dim)
    assert "_ShiftFunction" in graph_nodes(out)  # the custom path ran, not the views + cat form
    assert torch.autograd.gradcheck(lambda t: temporal_shift(t, SEGMENTS, direction=direction, channel_dim=dim), (x,))
    def shift(t):
        return temporal_shift(t, SEGMENTS, direction=direction, channel_dim=dim)

    assert torch.autograd.gradgradcheck(shift, (x,))


@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_path_equals_exported_form_and_keeps_layout(direction, layout):
    x, dim = make_input(layout, torch.float32)
    out = temporal_shift(x, SEGMENTS, direction=direction, channel_dim=dim)
    assert torch.equal(out, reference(x, direction, dim))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_custom_path_saves_no_tensors(direction, layout):
    x, dim = make_input(layout, torch.float32)
    x.requires_grad_(True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = temporal_shift(x, SEGMENTS, direction=direction, channel_dim=dim)
    assert packed == []
    out.sum().backward()
    assert x.grad is not None


def test_eager_path_has_no_full_zero_fill():
    x = torch.randn(2 * SEGMENTS, 16, 6, 6)
    with Counter() as counter:
        temporal_shift(x, SEGMENTS)
    names = [str(func) for func, _ in counter.calls]
    assert not any("zeros" in n or "cat" in n for n in names), names
    for func, shape in counter.calls:
        if "zero_" in str(func) or "fill" in str(func):
            assert shape is not None and shape.numel() < x.numel() // SEGMENTS


def test_traced_path_is_functional():
    traced = torch.jit.trace(TemporalShift(SEGMENTS), torch.randn(2 * SEGMENTS, 16, 3, 3))
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "aten::cat" in kinds
    assert not {"aten::copy_", "aten::zero_", "aten::fill_"} & kinds
    x = torch.randn(2 * SEGMENTS, 16, 3, 3)
    assert torch.equal(traced(x), temporal_shift(x, SEGMENTS))


def _peak_training_bytes(net, x):
    from tsm_surgery.integrations.studies.bench import LiveTensorBytes

    net.train()
    net(x).sum().backward()
    with LiveTensorBytes() as counter:
        for p in net.parameters():
            counter.track(p)
            counter.track(p.grad)
        counter.track(x)
        net(x).sum().backward()
    return counter.peak


def test_recompute_scope_saves_memory_and_keeps_gradients():
    import torchvision

    net = convert(randomize_norms(torchvision.models.resnet18(num_classes=5)), SEGMENTS)
    kept = copy.deepcopy(net)
    kept.recompute_shifts = False
    x = torch.randn(SEGMENTS, 3, 32, 32)
    for model in (net, kept):
        model.train()
        model.zero_grad()
        model(x).square().mean().backward()
    for (name, a), b in zip(net.named_parameters(), kept.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # Each of the 8 sites keeps one shifted copy less.
    assert _peak_training_bytes(net, x) < _peak_training_bytes(kept, x)


def test_recompute_scope_refuses_a_modified_input():
    conv = nn.Conv2d(16, 16, 1)
    x = torch.randn(2 * SEGMENTS, 16, 3, 3, requires_grad=True)
    base = x * 1.0
    with recompute_shifts():
        y = conv(temporal_shift(base, SEGMENTS))
    base.mul_(2)  # the shift's input changed after the conv saved the recipe
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_recompute_scope_defers_to_callers_hooks():
    conv = nn.Conv2d(16, 16, 1)
    x = torch.randn(2 * SEGMENTS, 16, 3, 3, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recompute_shifts():
        conv(temporal_shift(x, SEGMENTS)).sum().backward()
    assert packed  # the caller's hooks saw the conv's saved tensors


def test_compile_fullgraph_matches_eager():
    net = convert(randomize_norms(TinyResNet()), SEGMENTS)
    x = torch.randn(2 * SEGMENTS, 3, 8, 8)
    net.eval()
    explain = torch._dynamo.explain(net)(x)
    assert explain.graph_break_count == 0
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)
    # training: forward and backward through the compiled graph
    net.train()
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True)
    compiled(x).square().mean().backward()
    eager(x).square().mean().backward()
    for (name, a), b in zip(net.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_op_matches_reference(layout, direction):
    # Under torch.compile the op takes its select-over-rolled-frames form; 3 clips, so the
    # roll over the folded batch crosses clip boundaries that the mask must zero.
    x, dim = make_input(layout, dtype=torch.float32, batch=3 * SEGMENTS)
    x.requires_grad_(True)
    compiled = torch.compile(lambda t: temporal_shift(t, SEGMENTS, 8, direction, dim), fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, reference(x.detach(), direction, dim))
    grad = torch.randn_like(out)
    (compiled_grad,) = torch.autograd.grad(out, x, grad)
    (eager_grad,) = torch.autograd.grad(temporal_shift(x, SEGMENTS, 8, direction, dim), x, grad)
    assert torch.equal(compiled_grad, eager_grad)


def test_compiled_shift_is_fused_without_layout_copies():
    # Inductor runs CPU convolutions channels-last. A shift lowered to `cat` got contiguous
    # buffers of its own and a transposing copy back before each conv (1.3-1.4x end to end on
    # ResNet-50). The select form must fuse into the kernels the 2D network already has, add
    # one buffer per site (the shifted copy) and leave every activation channels-last.
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(2 * SEGMENTS, 3, 8, 8)
    activation = x.shape[0] * 16 * 8 * 8

    def compiled_call(net):
        with torch.no_grad():
            _, (code, *_) = run_and_get_code(torch.compile(net.eval(), fullgraph=True), x)
        body = code.split("def call(", 1)[1]
        buffers = [(tuple(map(int, shape.split(", "))), tuple(map(int, stride.split(", "))))
                   for shape, stride in re.findall(r"empty_strided_cpu\(\(([\d, ]+)\), \(([\d, ]+)\)", body)]
        return body.count("cpp_fused_"), buffers

    plain = randomize_norms(TinyResNet())
    net = convert(plain, SEGMENTS)
    kernels_2d, buffers_2d = compiled_call(plain)
    kernels, buffers = compiled_call(net)
    assert kernels == kernels_2d
    added = sum(math.prod(shape) for shape, _ in buffers) - sum(math.prod(shape) for shape, _ in buffers_2d)
    assert added <= len(net.temporal_shifts) * activation
    assert all(stride[1] == 1 for shape, stride in buffers if len(shape) == 4 and shape[0] == x.shape[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    net = convert(randomize_norms(TinyResNet()), SEGMENTS)
    x = torch.randn(2 * SEGMENTS, 3, 8, 8)
    net.eval()
    with torch.no_grad():
        full = net(x)
    net.train()
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        low = net(x)
    torch.testing.assert_close(low.float(), full, rtol=0.1, atol=0.1 * full.abs().max().item())
    # the op on a low-precision tensor keeps its dtype and moves the same entries
    y = torch.randn(2 * SEGMENTS, 16, 3, 3).to(dtype)
    assert torch.equal(temporal_shift(y, SEGMENTS), reference(y, "bi", 1))


def test_scripted_module_matches_eager():
    scripted = torch.jit.script(TemporalShift(SEGMENTS, direction="uni"))
    x = torch.randn(2 * SEGMENTS, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    assert torch.equal(scripted(x), temporal_shift(x, SEGMENTS, direction="uni"))

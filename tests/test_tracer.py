"""Tracing rules: the registries, train/eval graphs, fixed default arguments, graph constants."""

import copy
import math
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from tsm_surgery import TemporalShift, convert, find_residual_sites
from tsm_surgery._fast_paths import without_fast_paths
from tsm_surgery._tracer import TraceError, trace


class WithAux(nn.Module):
    """An auxiliary head that exists only in training, and optional forward arguments."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.aux = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x, mask=None, scale: float = 1.0):
        x = self.stem(x)
        y = (x + self.block(x)) * scale
        if self.training:
            return y, x + self.aux(x)
        return y


def test_train_only_joins_stay_unshifted_and_defaults_are_fixed():
    model = WithAux()
    graph = trace(model.eval())
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x"]
    net = convert(model, 2, example_input=torch.randn(1, 3, 8, 8))
    assert [s.name for s in net.sites] == ["block"]
    net.train()
    out, aux = net(torch.randn(4, 3, 8, 8))
    (out.sum() + aux.sum()).backward()
    plain = without_fast_paths(net.train_graph)  # the shift and its conv as two nodes
    shifts = [n for n in plain.nodes if n.op == "call_module" and n.target.startswith("temporal_shifts")]
    assert len(shifts) == 1


def test_timm_registered_blocks_are_traced_into_unless_untraceable():
    fx_registry = pytest.importorskip("timm.layers._fx")

    class RegisteredBlock(nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

        def forward(self, x):
            return x + self.body(x)

    class RegisteredUntraceable(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.gate = nn.Conv2d(3, 8, 1), RegisteredBlock(), RegisteredUntraceable()

        def forward(self, x):
            return self.gate(self.block(self.stem(x)))

    fx_registry.register_notrace_module(RegisteredBlock)
    fx_registry.register_notrace_module(RegisteredUntraceable)
    graph = trace(Net())
    assert graph.kept_whole == (RegisteredUntraceable,)
    assert [s.name for s in find_residual_sites(Net(), torch.randn(1, 3, 8, 8))] == ["block"]


class ConstantInForward(nn.Module):
    """Swin-style: a tensor built in forward becomes a graph constant."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        x = self.stem(x)
        return x + self.body(x) * torch.tensor([0.5])


def test_traced_tensor_constants_survive_conversion_and_copies():
    net = convert(ConstantInForward(), 2, example_input=torch.randn(1, 3, 8, 8)).eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(copy.deepcopy(net)(x), net(x))


class Untraceable(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_trace_error_names_the_module_and_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Untraceable())
    with pytest.raises(TraceError, match=r"(?s)module '1' \(Untraceable\).*leaf_modules=\[Untraceable\]"):
        trace(model)
    assert [n.op for n in trace(model, [Untraceable]).nodes].count("call_module") == 2


def test_timm_registry_is_read_only_when_timm_is_loaded():
    # The core never imports timm; with timm absent from sys.modules, the tracer sees no timm entries.
    code = ("import sys; from tsm_surgery._tracer import SiteTracer; t = SiteTracer(); "
            "assert 'timm' not in sys.modules and t.soft_leaf_types == ()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


class WindowBlock(nn.Module):
    """TinyViT-style: a fast path when the input is exactly one window, padding otherwise."""

    def __init__(self, c=8, window=4):
        super().__init__()
        self.window, self.body = window, nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x):
        _, _, h, w = x.shape
        if h == self.window and w == self.window:
            return x + self.body(x)
        pad = math.ceil(h / self.window) * self.window - h  # MobileViT-style size arithmetic
        y = self.body(nn.functional.pad(x, (0, pad, 0, pad)))[:, :, :h, :w]
        return x + y


class BranchOnBatch(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] > 1 else x


def test_branches_on_spatial_sizes_are_decided_on_the_example_and_guarded():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), WindowBlock()).eval()
    with pytest.raises(TraceError, match="control flow"):
        trace(model)  # no example: nothing to decide the branch on
    for size in (4, 6):  # the fast path, and the padded path
        image = torch.randn(1, 3, size, size)
        assert [s.name for s in find_residual_sites(model, image)] == ["1"]
        net = convert(model, 2, example_input=image).eval()
        clip = torch.randn(4, 3, size, size)
        assert not torch.allclose(net(clip), model(clip))
    # The fast path's size: the net traces its 2D model again at that size, as a conversion there would.
    clip = torch.randn(4, 3, 4, 4)
    fast = convert(model, 2, example_input=clip[:1]).eval()
    copied, pickled = copy.deepcopy(net), pickle.loads(pickle.dumps(net))
    with torch.no_grad():
        for served in (net, copied, pickled):
            torch.testing.assert_close(served(clip), fast(clip))
    assert net(torch.randn(2, 3, 10, 10)).shape == (2, 8, 10, 10)  # another size on the padded branch
    assert len(set(net.size_variants.served.values())) == 2


def test_branches_on_values_or_the_batch_size_still_fail():
    image = torch.randn(1, 3, 4, 4)
    with pytest.raises(TraceError, match="BranchOnBatch"):
        trace(nn.Sequential(nn.Conv2d(3, 8, 1), BranchOnBatch()), example_input=image)

    class BranchOnValue(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TraceError, match="BranchOnValue"):
        trace(nn.Sequential(nn.Conv2d(3, 8, 1), BranchOnValue()), example_input=image)


@pytest.mark.parametrize(("name", "sizes", "branchings"), [
    ("vgg11", (96, 224, 64), 2),  # pre_logits pads maps under 7x7 (96 and 64) and holds a block_entry site
    # a block attends in one window when its map is the window
    pytest.param("tiny_vit_5m_224", (56, 64, 224), 3, marks=pytest.mark.slow),
])
def test_a_converted_network_serves_every_input_size(monkeypatch, name, sizes, branchings):
    """Converted with the default example (224), a network whose shifted sites lie inside branches on
    the input size runs every size. Two references: a network converted directly at that size (its
    numbers with the shifts), and the 2D model itself with the shifts switched off, whose eager
    forward takes its own branches (equal frames would not do: the shift zero-fills the clip ends)."""
    timm = pytest.importorskip("timm")
    from utils import randomize_norms

    model = randomize_norms(timm.create_model(name, num_classes=5)).eval()
    kwargs = {"no_residual": "block_entry"} if name == "vgg11" else {}
    net = convert(model, 2, **kwargs).eval()
    clips = {size: torch.randn(4, 3, size, size) for size in sizes}
    with torch.no_grad():
        served = {size: net(clip) for size, clip in clips.items()}
        for size, clip in clips.items():
            direct = convert(model, 2, example_input=clip[:1], **kwargs).eval()
            torch.testing.assert_close(served[size], direct(clip))
        assert len(set(net.size_variants.served.values())) == branchings
        monkeypatch.setattr(TemporalShift, "forward", lambda self, x, **kwargs: x)
        for size in reversed(sizes):  # back and forth between the graphs
            torch.testing.assert_close(net(clips[size]), model(clips[size]))

"""The converted network's eager fast paths: recompute hooks only at the shift sites in training,
in-place slot moves around the first layer in eval, and no graph breaks under torch.compile.

Behaviour only; ``tsm-surgery bench`` prints the ratios and the packs per step.
"""

import copy

import pytest
import timm
import torch
import torchvision
from torch import fx, nn
from utils import randomize_norms

from tsm_surgery import _online_graph, _recompute, convert, temporal_shift, to_online
from tsm_surgery._fast_paths import swapped_sites, without_fast_paths

SEGMENTS = 4


class _Packs:
    """Counts the tensors the recompute hooks pack through Python."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = _recompute._pack

        def counting(t):
            self.count += 1
            return original(t)

        monkeypatch.setattr(_recompute, "_pack", counting)


def _copy_form(net):
    """The same modules running the eval graph without the in-place moves (every site copies)."""
    return fx.GraphModule(net, without_fast_paths(net.eval_graph)).eval()


def test_resnet50_train_step_packs_two_tensors_per_site(monkeypatch):
    # Only the shift outputs' consumers (each branch's first conv: its input and its weight)
    # save through the Python hooks; every other saved tensor stays with autograd.
    net = convert(torchvision.models.resnet50(num_classes=10), SEGMENTS, example_input=torch.randn(1, 3, 32, 32))
    net.train()
    x = torch.randn(SEGMENTS, 3, 32, 32)
    packs = _Packs(monkeypatch)
    net(x).sum().backward()
    assert len(net.sites) == 16
    assert 0 < packs.count <= 2 * len(net.sites)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        net(x).sum()
    assert len(saved) > 10 * packs.count  # what hooks over the whole forward would have packed


def test_site_hooks_keep_gradients_and_the_in_place_check():
    net = convert(randomize_norms(torchvision.models.resnet18(num_classes=5)), SEGMENTS,
                  example_input=torch.randn(1, 3, 32, 32))
    kept = copy.deepcopy(net)
    kept.recompute_shifts = False
    x = torch.randn(SEGMENTS, 3, 32, 32)
    for model in (net, kept):
        model.train()
        model(x).square().mean().backward()
    for (name, a), b in zip(net.named_parameters(), kept.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # A consumer that raised leaves no hooks open behind it.
    net.layer1[0].conv1.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        net(x)
    assert _recompute._RECOMPUTE.site_hooks == [] and _recompute._RECOMPUTE.depth == 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5)


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=5),
    "vit_tiny": _vit,
    "convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=5),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("direction", ["bi", "uni"])
def test_in_place_eval_equals_the_copy_form(name, direction):
    net = convert(randomize_norms(MODELS[name]()), SEGMENTS, direction=direction,
                  example_input=torch.randn(1, 3, 32, 32)).eval()
    assert len(swapped_sites(net.eval_graph)) == len(net.sites)
    x = torch.randn(2 * SEGMENTS, 3, 32, 32)
    if name == "resnet18":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(net(x), _copy_form(net)(x))
    with torch.inference_mode():
        assert torch.equal(net(x), _copy_form(net)(x))
    # With autograd on in eval mode (saliency) every site copies, and gradients flow.
    x.requires_grad_(True)
    net(x).sum().backward()
    assert x.grad is not None


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest tensor an op creates, to tell a shifted copy from a one-slot scratch."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.empty_like.default, torch.ops.aten.clone.default):
            self.created.append(out.numel())
        return out


def _largest_copy(module, x):
    with torch.no_grad(), _Counter() as counter:
        module(x)
    return max(counter.created, default=0)


class Block(nn.Module):
    """``x + branch(x)``, optionally with the shortcut read first, or ``x`` written in place after the branch."""

    def __init__(self, shortcut_first=False, write_after=False, first=None):
        super().__init__()
        self.first = first or nn.Conv2d(16, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.shortcut_first, self.write_after = shortcut_first, write_after

    def forward(self, x):
        if self.shortcut_first:
            shortcut = x * 2.0  # reads the block input between the shift and the branch's first layer
            return shortcut + self.conv(torch.relu(self.first(x)))
        y = self.conv(torch.relu(self.first(x)))
        if self.write_after:
            return x.add_(y)
        return x + y


class Net(nn.Module):
    def __init__(self, block, view_input=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = block
        self.view_input = view_input

    def forward(self, x):
        x = self.stem(x)
        if self.view_input:
            x = x.flatten(2).view(x.shape)  # the block input is a view of another tensor
        return self.block(x).mean((2, 3))


# case -> (the block, the block input a view, the graph marks the site for swapping, it swaps at run time)
CASES = {
    "plain": (lambda: Block(), False, True, True),
    "reader_between": (lambda: Block(shortcut_first=True), False, False, False),
    "written_in_place_after": (lambda: Block(write_after=True), False, False, False),
    "not_a_plain_layer": (lambda: Block(first=nn.Hardtanh()), False, False, False),
    "view": (lambda: Block(), True, True, False),
}


@pytest.mark.parametrize("case", CASES)
def test_in_place_eval_refusals(case):
    make_block, view_input, marked, swaps = CASES[case]
    net = convert(Net(make_block(), view_input), SEGMENTS, example_input=torch.randn(1, 3, 6, 6)).eval()
    assert len(net.sites) == 1
    assert (len(swapped_sites(net.eval_graph)) == 1) == marked
    x = torch.randn(2 * SEGMENTS, 3, 6, 6)
    activation = x.shape[0] * 16 * 6 * 6
    copy_form = _copy_form(net)
    with torch.no_grad():
        assert torch.equal(net(x), copy_form(x))
    assert _largest_copy(copy_form, x) == activation
    if swaps:
        assert _largest_copy(net, x) <= activation // 4  # the scratch: the two moving slots
    else:
        assert _largest_copy(net, x) == activation  # the shifted copy


def test_in_place_shift_restores_its_input_exactly():
    from tsm_surgery._shift import TemporalShift, restore_slots

    for layout in ("contiguous", "channels_last", "tokens"):
        for direction, uni_slot in (("bi", "past"), ("uni", "past"), ("uni", "first")):
            if layout == "tokens":
                x, dim = torch.randn(2 * SEGMENTS, 5, 16), -1
            else:
                x, dim = torch.randn(2 * SEGMENTS, 16, 3, 4), 1
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
            shift = TemporalShift(SEGMENTS, direction=direction, channel_dim=dim, uni_slot=uni_slot)
            before = x.clone()
            expected = temporal_shift(x, SEGMENTS, direction=direction, channel_dim=dim, uni_slot=uni_slot)
            with torch.no_grad():
                out = shift(x, swap=True)
            assert out is x and torch.equal(out, expected)
            restore_slots(x)
            assert torch.equal(x, before)


def test_copies_pickles_script_and_online_forms_keep_working():
    net = convert(randomize_norms(torchvision.models.resnet18(num_classes=5)), SEGMENTS, direction="uni",
                  example_input=torch.randn(1, 3, 32, 32)).eval()
    x = torch.randn(SEGMENTS, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
        clone = copy.deepcopy(net)
        assert swapped_sites(clone.eval_graph) == swapped_sites(net.eval_graph)
        assert torch.equal(clone(x), expected)
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x), expected)
        online = to_online(net)
        frames = [online(frame[None]) for frame in x]
    torch.testing.assert_close(frames[-1][0], expected[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit_tiny"])
def test_no_graph_breaks_in_train_and_eval(name):
    # ResNet-18 stands for ResNet-50 (same blocks, a quarter of the compile time), at 32 px.
    net = convert(randomize_norms(MODELS[name]()), SEGMENTS, example_input=torch.randn(1, 3, 32, 32))
    x = torch.randn(SEGMENTS, 3, 32, 32)
    for mode in (False, True):
        net.train(mode)
        torch._dynamo.reset()
        explain = torch._dynamo.explain(net)(x)
        assert explain.graph_break_count == 0, (mode, explain.break_reasons)
        assert explain.graph_count == 1


def _online_without_joins(net, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(_online_graph, "_join_in_place", lambda graph, root: None)
        return to_online(net)


def test_online_residual_joins_add_into_the_layer_output(monkeypatch):
    net = convert(randomize_norms(torchvision.models.resnet18(num_classes=5)), SEGMENTS, direction="uni",
                  example_input=torch.randn(1, 3, 32, 32)).eval()
    online, plain = to_online(net), _online_without_joins(net, monkeypatch)
    joins = [n for n in online.step_module.graph.nodes if n.target is _online_graph._join]
    assert len(joins) == 8  # one `out += identity` per BasicBlock, which FX records as `out + identity`
    assert not any(n.target is _online_graph._join for n in plain.step_module.graph.nodes)
    frames = torch.randn(SEGMENTS, 2, 3, 32, 32)
    with torch.no_grad():
        state, plain_state = online.init_state(2, frame_shape=(3, 32, 32)), plain.init_state(2, frame_shape=(3, 32, 32))
        for frame in frames:
            (out, state), (expected, plain_state) = online.step(frame, state), plain.step(frame, plain_state)
            assert torch.equal(out, expected)
            assert all(torch.equal(state[k], plain_state[k]) for k in state)
    # With autograd (backpropagation through time) the join stays exact and differentiable.
    leaf = frames[0].clone().requires_grad_()
    grads = []
    for module in (online, plain):
        state = module.init_state(2, frame_shape=(3, 32, 32))
        out, state = module.step(leaf, state)
        out, _ = module.step(frames[1], state)
        grads.append(torch.autograd.grad(out.sum(), leaf)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_eval_residual_joins_add_into_the_layer_output():
    """The clip network's eval graph adds each `out += identity` into the fresh layer output, as eager
    torchvision does; exact, differentiable, and the train graph and TorchScript keep the plain sum."""
    net = convert(randomize_norms(torchvision.models.resnet18(num_classes=5)), SEGMENTS,
                  example_input=torch.randn(1, 3, 32, 32)).eval()
    assert len([n for n in net.eval_graph.nodes if n.target is _online_graph._join]) == 8  # one per BasicBlock
    assert not any(n.target is _online_graph._join for n in net.train_graph.nodes)
    assert not any(n.target is _online_graph._join for n in without_fast_paths(net.eval_graph).nodes)
    plain = fx.GraphModule(net, without_fast_paths(net.eval_graph))
    x = torch.randn(2 * SEGMENTS, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
    leaf = x.clone().requires_grad_()  # eval mode with autograd on: the in-place sum stays exact
    grads = [torch.autograd.grad(module(leaf).sum(), leaf)[0] for module in (net, plain)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_join_writes_in_place_only_when_the_sum_fits_the_left_operand():
    left, right = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = left + right
    out = _online_graph._join(left, right)
    assert out is left and torch.equal(out, expected)
    for other in (torch.randn(3, 2, 3, 4), right.double(), 2.0):  # a larger broadcast, a promotion, a number
        before = left.clone()
        out = _online_graph._join(left, other)
        assert out is not left and torch.equal(left, before) and torch.equal(out, before + other)


class _Joins(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        fresh = self.conv(x) + x  # joined: a fresh conv output read only by the sum
        kept = self.norm(fresh)
        read_twice = kept + fresh  # refused: `kept` is returned as well
        activated = self.act(read_twice) + x  # refused: an activation's output, not in the fresh list
        return x + read_twice, kept, activated  # refused: the graph input


def test_join_refusals():
    module = _Joins().eval()
    graph = fx.symbolic_trace(module).graph
    _online_graph._join_in_place(graph, module)
    joined = [n for n in graph.nodes if n.target is _online_graph._join]
    assert [n.args[0].target for n in joined] == ["conv"]
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        expected = module(x)
        out = fx.GraphModule(module, graph)(x)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))

"""The converted network's eager fast paths: in training, shift and conv as one autograd unit and
recompute hooks only at the other sites; in eval, in-place slot moves around the first layer;
no graph breaks under torch.compile.

Behaviour only; ``tsm-surgery bench`` prints the ratios and the packs per step.
"""

import contextlib
import copy

import pytest
import timm
import torch
import torchvision
from torch import fx, nn
from utils import randomize_norms

from tsm_surgery import TemporalShift, _online_graph, _recompute, convert, temporal_shift, to_online
from tsm_surgery._fast_paths import swapped_sites, without_fast_paths
from tsm_surgery._shifted_conv import _ShiftedConv, shifted_conv2d, shifted_conv_module

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


def _converted_with_clip(make, direction, channels_last=False):
    net = convert(randomize_norms(make()), SEGMENTS, direction=direction, example_input=torch.randn(1, 3, 32, 32))
    x = torch.randn(2 * SEGMENTS, 3, 32, 32)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return net, x


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("direction", ["bi", "uni"])
def test_in_place_eval_equals_the_copy_form(name, direction):
    net, x = _converted_with_clip(MODELS[name], direction, channels_last=name == "resnet18")
    net.eval()
    assert len(swapped_sites(net.eval_graph)) == len(net.sites)
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


def _fused_sites(graph):
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (shifted_conv2d, shifted_conv_module)]


def test_resnet50_train_step_packs_no_tensor_through_python(monkeypatch):
    # Each branch's first conv and its shift are one autograd unit that saves the block input
    # with autograd's own check: no tensor of a ResNet-50 step goes through the Python hooks.
    net = convert(torchvision.models.resnet50(num_classes=10), SEGMENTS, example_input=torch.randn(1, 3, 32, 32))
    net.train()
    assert len(net.sites) == 16 and len(_fused_sites(net.train_graph)) == 16
    x = torch.randn(SEGMENTS, 3, 32, 32)
    packs = _Packs(monkeypatch)
    net(x).sum().backward()
    assert packs.count == 0


def test_sites_without_a_conv_pack_what_their_first_layer_saves(monkeypatch):
    # A ViT block's shift feeds a LayerNorm: that consumer saves five tensors (the shift output,
    # as a recipe, its weight, bias, mean and rstd) through the hooks opened around it, and
    # nothing else packs through Python.
    net = convert(_vit(), SEGMENTS, example_input=torch.randn(1, 3, 32, 32)).train()
    assert _fused_sites(net.train_graph) == []
    x = torch.randn(SEGMENTS, 3, 32, 32)
    packs = _Packs(monkeypatch)
    net(x).sum().backward()
    assert packs.count == 5 * len(net.sites)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        net(x).sum()
    assert len(saved) > 2 * packs.count  # what hooks over the whole forward would have packed


def _plain_train_form(net):
    """The same modules running the train graph as shift and conv, two ops (a shifted copy per site)."""
    return fx.GraphModule(net, without_fast_paths(net.train_graph)).train()


def _train_step(model, x):
    torch.manual_seed(0)  # the same dropout masks for both forms
    for param in model.parameters():
        param.grad = None
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), x.grad, {name: param.grad for name, param in model.named_parameters()}


def _mmaction_resnet18():
    from mmaction.models.backbones import ResNet

    return nn.Sequential(ResNet(depth=18, pretrained=None, norm_eval=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())


TRAIN_MODELS = {
    "resnet18": MODELS["resnet18"],  # torchvision: the conv is a module call
    "mmaction_resnet18": _mmaction_resnet18,  # mmcv's ConvModule traces to F.conv2d
    "mobilenet_v2": MODELS["mobilenet_v2"],  # each branch starts with a 1x1 expansion conv
    "convnext_atto": MODELS["convnext_atto"],  # a depthwise 7x7 conv (groups = channels)
}


@pytest.mark.parametrize("name", TRAIN_MODELS)
@pytest.mark.parametrize("direction", ["bi", "uni"])
def test_shift_and_conv_unit_equals_the_two_ops(name, direction):
    net, x = _converted_with_clip(TRAIN_MODELS[name], direction, channels_last=name == "resnet18")
    net.train()
    assert len(_fused_sites(net.train_graph)) == len(net.sites)
    ours, reference = _train_step(net, x), _train_step(_plain_train_form(net), x)
    assert torch.equal(ours[0], reference[0])
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-7)
    for param_name, grad in reference[2].items():
        torch.testing.assert_close(ours[2][param_name], grad, rtol=1e-5, atol=1e-7, msg=param_name)


def test_shift_and_conv_unit_leaves_its_input_as_it_was():
    shift, conv = TemporalShift(SEGMENTS), nn.Conv2d(16, 8, 3, padding=1, bias=True)
    x = torch.randn(2 * SEGMENTS, 16, 5, 5, requires_grad=True)
    block_input = x * 1.0  # a non-leaf with autograd history, like a block input
    before, version = block_input.detach().clone(), block_input._version
    with _recording():
        out = shifted_conv_module(block_input, shift, conv)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_ShiftedConvBackward"
    assert torch.equal(block_input, before) and block_input._version == version
    out.square().sum().backward()
    assert torch.equal(block_input, before) and block_input._version == version
    reference_x = x.detach().clone().requires_grad_()
    conv_grads = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    conv(temporal_shift(reference_x, SEGMENTS)).square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)
    for ours, theirs in zip(conv_grads, conv.parameters()):
        torch.testing.assert_close(ours, theirs.grad)


def test_shift_and_conv_unit_keeps_the_in_place_check():
    # The block input written in place after the forward, before the backward: autograd's own
    # version check refuses, as it would for the conv of the two-op form.
    shift, conv = TemporalShift(SEGMENTS), nn.Conv2d(16, 8, 1)
    block_input = torch.randn(SEGMENTS, 16, 3, 3, requires_grad=True) * 1.0
    with _recording():
        out = shifted_conv_module(block_input, shift, conv)
    block_input.detach().add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_shift_and_conv_unit_double_backward():
    shift = TemporalShift(SEGMENTS, shift_div=4)
    weight = torch.randn(4, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        with _recording():
            return shifted_conv2d(x * 1.0, shift, weight, bias, stride=2, padding=1)

    x = torch.randn(SEGMENTS, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@contextlib.contextmanager
def _recording():
    """A converted network's train forward, for calling the unit on its own."""
    _recompute._RECOMPUTE.depth += 1
    try:
        yield
    finally:
        _recompute._RECOMPUTE.depth -= 1


def _unit_calls(monkeypatch):
    calls = []
    original = _ShiftedConv.apply
    monkeypatch.setattr(_ShiftedConv, "apply", lambda *args: calls.append(1) or original(*args))
    return calls


# case -> what changes how the train step runs; every case must give the two-op form's gradients
FALLBACKS = {
    "recompute_off": lambda net: setattr(net, "recompute_shifts", False),
    "hook_on_the_conv": lambda net: net.layer1[0].conv1.register_forward_hook(lambda m, i, o: None),
    "autocast": None,
    "checkpointing_hooks": None,
    "shift_module_replaced": lambda net: _replace_first_shift(net),
}


class _OwnShift(TemporalShift):
    """A shift module of the user's own kind (here computing the same): the unit leaves it to run."""

    def forward(self, x, swap=False):
        return super().forward(x, swap)


def _replace_first_shift(net):
    shifts = net.temporal_shifts
    key = next(iter(shifts.keys()))
    shifts[key] = _OwnShift(SEGMENTS)


@pytest.mark.parametrize("case", FALLBACKS)
def test_shift_and_conv_unit_falls_back_to_the_two_ops(case, monkeypatch):
    net = convert(randomize_norms(torchvision.models.resnet18(num_classes=5)), SEGMENTS,
                  example_input=torch.randn(1, 3, 32, 32)).train()
    x = torch.randn(SEGMENTS, 3, 32, 32)
    reference = _train_step(_plain_train_form(net), x)
    if FALLBACKS[case] is not None:
        FALLBACKS[case](net)
    calls = _unit_calls(monkeypatch)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = _train_step(net, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = _train_step(_plain_train_form(net), x)
    elif case == "checkpointing_hooks":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            ours = _train_step(net, x)
    else:
        ours = _train_step(net, x)
    expected_calls = len(net.sites) - 1 if case in ("hook_on_the_conv", "shift_module_replaced") else 0
    assert len(calls) == expected_calls
    assert torch.equal(ours[0], reference[0])
    for name, grad in reference[2].items():
        torch.testing.assert_close(ours[2][name], grad, msg=name)


def test_shift_and_conv_unit_refusals_in_the_graph():
    # A reader of the block input between the shift and the conv, a block input written in place
    # after the branch, a first layer that is not a conv: the site keeps shift and layer apart.
    for make_block, fused in ((lambda: Block(), 1), (lambda: Block(shortcut_first=True), 0),
                              (lambda: Block(write_after=True), 0), (lambda: Block(first=nn.BatchNorm2d(16)), 0),
                              (lambda: Block(first=nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular")), 0)):
        net = convert(Net(make_block()), SEGMENTS, example_input=torch.randn(1, 3, 6, 6)).train()
        assert len(net.sites) == 1
        assert len(_fused_sites(net.train_graph)) == fused
        x = torch.randn(2 * SEGMENTS, 3, 6, 6)
        ours, reference = _train_step(net, x), _train_step(_plain_train_form(net), x)
        torch.testing.assert_close(ours[1], reference[1])


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


def _at_storage_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """``x``'s values in a tensor that starts ``offset`` elements into its storage and is not a view."""
    storage = torch.empty(offset + x.numel() + 3, dtype=x.dtype)
    out = torch.empty(0, dtype=x.dtype).set_(storage.untyped_storage(), offset, x.shape, x.stride())
    out.copy_(x)
    return out


@pytest.mark.parametrize("reverse", [False, True], ids=["shift", "gradient"])
@pytest.mark.parametrize("mode", ["bi", "uni", "uni_first"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens", "5d", "one frame", "storage offset"])
def test_slot_moves_equal_the_copy_form_and_put_back_exactly(layout, mode, reverse):
    from tsm_surgery._in_place import move_slots, put_back
    from tsm_surgery._shift import _shift_copy

    frames, dim = (1 if layout == "one frame" else SEGMENTS), (-1 if layout == "tokens" else 1)
    shape = {"tokens": (2 * frames, 5, 24), "5d": (2 * frames, 24, 2, 3, 2)}.get(layout, (2 * frames, 24, 3, 5))
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "storage offset":
        x = _at_storage_offset(x, 7)
    dim %= x.dim()
    # the reference: the (N, T, ...) clips of the memory order's view, shifted by the copy form
    memory_order = x.permute(0, 2, 3, 1) if layout == "channels_last" else x
    view_dim = 3 if layout == "channels_last" else dim
    clips = memory_order.reshape(2, frames, *memory_order.shape[1:])
    expected = _shift_copy(clips.contiguous(), view_dim + 1, 3, mode, reverse).reshape(memory_order.shape)
    before = x.clone()
    scratch, slots = move_slots(x, frames, 3, mode, dim, reverse)
    assert torch.equal(memory_order, expected)
    put_back(x, scratch, slots)
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

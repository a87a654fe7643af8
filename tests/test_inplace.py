"""In-place ops at shift sites: the converted network keeps the 2D model's aliasing and its gradients.

In a 2D block ``x + branch(x)`` whose branch starts with an in-place op (``nn.ReLU(inplace=True)``,
``x.relu_()``, ...), the op changes ``x`` itself, so the shortcut adds the changed tensor. Each
style below is such a block; ``pre`` is what its in-place op does to ``x`` (seen by both sides),
``rest`` the branch after it. The hand-written TSM of every style is
``y = pre(x); y + rest(shift(y))``: the in-place op stays on the trunk, the branch reads the
shifted result. The converted network must equal it in outputs and gradients (weights and
input), with the shift recompute on and off, in train and eval mode, and stream it online.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import tsm_surgery
from tsm_surgery import temporal_shift
from tsm_surgery._recompute import recompute_shifts

C, T, CLIPS, SIZE, DIV = 8, 4, 2, 6, 4
TOL = dict(rtol=1e-9, atol=1e-9)  # float64 throughout


def _rest() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1))


class InPlaceStart(nn.Module):
    """``x + branch(x)`` with ``branch = Sequential(op, *rest)``: the issue's block."""

    def __init__(self, op: nn.Module, pre):
        super().__init__()
        self.branch = nn.Sequential(op, *_rest())
        self.pre = pre

    def forward(self, x):
        return x + self.branch(x)

    def rest(self, y):
        return self.branch[1:](y)


class Written(nn.Module):
    """A block whose forward writes the in-place op as a call (``x.relu_()``, ``F.relu(..., inplace=True)``)."""

    def __init__(self, call, pre):
        super().__init__()
        self.call, self.pre = call, pre
        self.convs = _rest()

    def forward(self, x):
        return x + self.convs(self.call(x))

    def rest(self, y):
        return self.convs(y)


class Discarded(InPlaceStart):
    """The in-place op runs for its side effect only: ``self.act(x); return x + branch(x)``."""

    def __init__(self):
        super().__init__(nn.Identity(), F.relu)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        self.act(x)
        return x + self.branch(x)


class GateInPlace(Written):
    """A squeeze-excite gate applied in place at the branch start: two branch ops read ``x``."""

    def __init__(self):
        super().__init__(lambda x: x.mul_(torch.sigmoid(x.mean((2, 3), keepdim=True))),
                         lambda x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)))

    def forward(self, x):
        return x + self.convs(x.mul_(torch.sigmoid(x.mean((2, 3), keepdim=True))))


class ClampInPlace(nn.Module):
    """A module that changes its input in place without an ``inplace`` attribute; kept as a leaf."""

    def forward(self, x):
        return x.clamp_(min=-0.2)


class JoinInPlace(nn.Module):
    """``x.add_(branch(x))``: the join writes into the block input after the branch read it."""

    def __init__(self):
        super().__init__()
        self.convs = _rest()
        self.pre = lambda x: x

    def forward(self, x):
        return x.add_(self.convs(x))

    def rest(self, y):
        return self.convs(y)


STYLES = {
    "nn.ReLU(inplace=True)": lambda: InPlaceStart(nn.ReLU(inplace=True), F.relu),
    "nn.Hardswish(inplace=True)": lambda: InPlaceStart(nn.Hardswish(inplace=True), F.hardswish),
    "nn.SiLU(inplace=True)": lambda: InPlaceStart(nn.SiLU(inplace=True), F.silu),
    "nn.ReLU6(inplace=True)": lambda: InPlaceStart(nn.ReLU6(inplace=True), F.relu6),
    "nn.Dropout(inplace=True)": lambda: InPlaceStart(nn.Dropout(0.3, inplace=True), lambda x: x),
    "leaf module writing its input": lambda: InPlaceStart(ClampInPlace(), lambda x: x.clamp(min=-0.2)),
    "x.relu_()": lambda: Written(lambda x: x.relu_(), F.relu),
    "torch.relu_(x)": lambda: Written(torch.relu_, F.relu),
    "F.relu(x, inplace=True)": lambda: Written(lambda x: F.relu(x, inplace=True), F.relu),
    "x.add_(0.5)": lambda: Written(lambda x: x.add_(0.5), lambda x: x + 0.5),
    "x.mul_(gate(x))": GateInPlace,
    "act(x) for its side effect": Discarded,
    "x.add_(branch(x))": JoinInPlace,
}
# Dropout draws a random mask in training; its reference below draws the same one.
RANDOM_IN_TRAINING = {"nn.Dropout(inplace=True)"}


class Net(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.block = block
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _model(style: str) -> Net:
    torch.manual_seed(0)
    return Net(STYLES[style]()).double()


def _convert(model: Net, direction: str = "bi", **kwargs):
    leaves = [ClampInPlace] if any(isinstance(m, ClampInPlace) for m in model.modules()) else []
    return tsm_surgery.convert(model, T, shift_div=DIV, direction=direction, leaf_modules=leaves,
                               example_input=torch.randn(1, 3, SIZE, SIZE, dtype=torch.double), **kwargs)


def reference(model: Net, x: torch.Tensor, direction: str = "bi") -> torch.Tensor:
    """The hand-written TSM: explicit shift, then the branch; in-place ops stay on the trunk."""
    block, stem = model.block, model.stem(x)
    dropout = block.branch[0] if isinstance(block, InPlaceStart) else None
    y = dropout(stem) if isinstance(dropout, nn.Dropout) else block.pre(stem)
    return model.head(y + block.rest(temporal_shift(y, T, DIV, direction)))


def _clip() -> torch.Tensor:
    return torch.randn(CLIPS * T, 3, SIZE, SIZE, dtype=torch.double)


def _run(fn, x, seed=1):
    torch.manual_seed(seed)  # the same dropout mask for the network and its reference
    return fn(x)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("style", list(STYLES))
def test_outputs_equal_the_hand_written_reference(style, train):
    model = _model(style)
    net = _convert(model).train(train)
    model.train(train)
    x = _clip()
    with torch.no_grad():
        torch.testing.assert_close(_run(net, x.clone()), _run(lambda v: reference(model, v), x.clone()), **TOL)


@pytest.mark.parametrize("style", list(STYLES))
def test_static_clip_keeps_the_2d_output(style):
    """On a clip of identical frames the shift moves nothing into the middle frames, so there the
    converted network must give exactly the 2D model's output, in-place side effects included."""
    model = _model(style).eval()
    net = _convert(model).eval()
    frame = torch.randn(1, 3, SIZE, SIZE, dtype=torch.double)
    clip = frame.expand(T, -1, -1, -1).contiguous()
    with torch.no_grad():
        out, ref2d = net(clip.clone()), model(frame.clone())
    torch.testing.assert_close(out[1:T - 1], ref2d.expand(T - 2, -1), **TOL)


def _grads(module: nn.Module, fn, x: torch.Tensor):
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    _run(fn, x).square().sum().backward()
    return x.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "saved"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("style", list(STYLES))
def test_gradients_equal_the_hand_written_reference(style, train, recompute):
    model = _model(style).train(train)
    net = _convert(model).train(train)
    net.recompute_shifts = recompute
    x = _clip()
    # The block input needs a gradient of its own: in-place ops on a leaf's view are refused.
    got_x, got = _grads(net, net, x)
    want_x, want = _grads(model, lambda v: reference(model, v), x)
    torch.testing.assert_close(got_x, want_x, **TOL)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("style", sorted(set(STYLES) - RANDOM_IN_TRAINING))
def test_gradcheck_with_recompute(style):
    """The converted network's own analytic gradients, input and first branch weight, against
    finite differences (the recompute scope on, train mode)."""
    net = _convert(_model(style)).train()
    name = next(n for n, p in net.named_parameters() if n.startswith("block.") and p.dim() == 4)
    weight = net.get_parameter(name).detach().clone().requires_grad_(True)
    x = torch.randn(T, 3, SIZE, SIZE, dtype=torch.double, requires_grad=True)

    def fn(frames, w):
        return functional_call(net, {name: w}, (frames.clone(),))

    assert torch.autograd.gradcheck(fn, (x, weight), fast_mode=True)


@pytest.mark.parametrize("style", sorted(set(STYLES) - RANDOM_IN_TRAINING))
def test_online_streams_the_reference(style):
    model = _model(style).eval()
    online = _convert(model, direction="uni", online=True)
    clip = torch.randn(T, 3, SIZE, SIZE, dtype=torch.double)
    with torch.no_grad():
        want = reference(model, clip.clone(), direction="uni")
        got = torch.cat([online(clip[t:t + 1].clone()) for t in range(T)])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("op", [torch.relu_, lambda y: y.mul_(2.0), lambda y: y.transpose(2, 3).add_(1.0)],
                         ids=["relu_", "mul_", "view-add_"])
def test_recompute_scope_saves_a_shift_output_changed_in_place(op):
    """A shift output changed in place before its consumer saves it is saved as it is, not rebuilt
    from the shift's input (which would miss the change)."""
    conv = nn.Conv2d(C, C, 3, padding=1).double()
    x = torch.randn(2 * T, C, SIZE, SIZE, dtype=torch.double, requires_grad=True)
    grads = []
    for scope in (recompute_shifts, contextlib.nullcontext):
        conv.zero_grad()
        with scope():
            base = x * 1.0  # alive until backward, like the shortcut of a residual block
            shifted = temporal_shift(base, T, DIV)
            op(shifted)
            conv(shifted).square().sum().backward()
        grads.append(conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], **TOL)


class PermutedInPlace(Written):
    def __init__(self):
        super().__init__(None, None)

    def forward(self, x):
        return x + self.convs(x.transpose(2, 3).relu_().transpose(2, 3))


def test_in_place_op_on_a_view_at_the_branch_start_is_refused():
    with pytest.raises(ValueError, match=r"'block'.*in place.*select="):
        _convert(Net(PermutedInPlace()).double())


class SavedThenWritten(nn.Module):
    """Changes a tensor the branch's second conv saved for backward: the 2D backward raises."""

    def __init__(self):
        super().__init__()
        self.convs = _rest()

    def forward(self, x):
        h = self.convs[1](self.convs[0](x))
        out = self.convs[2](h)
        h.mul_(2.0)
        return x + out


def test_a_saved_tensor_changed_in_place_still_raises_under_recompute():
    model = Net(SavedThenWritten()).double().train()
    x = _clip().requires_grad_(True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()
    net = _convert(model).train()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        net(x).sum().backward()


class BiasFromInput(nn.Module):
    """``x = relu_(y)``; the branch's first layer takes its bias from ``y``, another name of ``x``'s memory."""

    def __init__(self, bias_from_input: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, 3, 3) / 9)
        self.bias = nn.Parameter(torch.randn(C))
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bias_from_input = bias_from_input

    def forward(self, y):
        x = torch.relu_(y)
        bias = y[0, :, 0, 0] if self.bias_from_input else self.bias
        return x + self.conv(F.conv2d(x, self.weight, bias, padding=1))


@pytest.mark.parametrize("bias_from_input, swapped", [(False, 1), (True, 0)])
def test_online_slot_swap_only_when_the_layer_reads_no_other_activation(bias_from_input, swapped):
    """The online step writes the cache into the site's input around its first layer; a layer that
    also reads another name of that memory (here a bias sliced from it) would see the cache."""
    from tsm_surgery import _online_graph

    online = _convert(Net(BiasFromInput(bias_from_input)).double(), direction="uni", online=True)
    restores = [n for n in online.graph.nodes if n.op == "call_function" and n.target is _online_graph._restore_slot]
    assert len(restores) == swapped
    frames = torch.randn(T, 1, 3, SIZE, SIZE, dtype=torch.double)
    state = online.init_state(1, frame_shape=(3, SIZE, SIZE))
    for frame in frames:  # without autograd (the swap where allowed) equals with it (always a copy)
        with torch.no_grad():
            fast, _ = online.step(frame.clone(), state)
        with torch.enable_grad():
            copied, state = online.step(frame.clone(), state)
        torch.testing.assert_close(fast, copied.detach(), **TOL)

"""A shift and the conv that reads it as one autograd unit: training without a shifted copy.

In a training forward, ``conv(shift(x))`` writes a shifted copy of the block input ``x`` (the
shortcut still needs ``x`` as it is), and its backward shifts the gradient into another new
tensor and rebuilds the copy for the weight gradient. :class:`_ShiftedConv` does none of that:

* forward: moves the slots of ``x`` in place (a scratch copy of the moving slots, ``2/shift_div``
  of the tensor), convolves, and puts the slots back before anything else can read ``x``;
* backward: the same around the conv's backward, then shifts the input gradient, a tensor the
  conv's backward has just made, in place the other way.

It saves ``x`` (alive anyway: it is the shortcut) and the weight with autograd's own version
check, so a later in-place write to ``x`` still fails the backward pass, and nothing goes
through Python saved-tensor hooks. The slot moves leave ``x``'s version counter as it was: the
tensor is bit for bit the same once the unit returns, so any earlier saver of ``x`` (the
previous block's in-place ReLU saves it) still finds it valid.

``convert`` puts the unit into the train graph where a shift feeds a 2D conv and nothing else
(:mod:`._fast_paths`); at run time it falls back to ``conv(shift(x))`` wherever in-place use of
``x`` is not safe or not worth it (see :func:`_fusable`).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._in_place import move_slots, put_back
from ._recompute import close_site_hooks, in_graph_capture, open_site_hooks, recording
from ._shift import _SWAPPED, TemporalShift, _check_input, _mode, _shift_copy, owns_dense_memory

__all__ = ["shifted_conv2d", "shifted_conv_module"]


class _SlotsMoved:
    """Moves the slots of ``x`` in place for the ``with`` block and puts them back after it."""

    def __init__(self, x: Tensor, n_segments: int, fold: int, mode: str):
        self.x, self.n_segments, self.fold, self.mode = x, n_segments, fold, mode

    def __enter__(self) -> Tensor:
        self.version = torch.autograd._unsafe_preserve_version_counter(self.x)
        self.version.__enter__()
        self.moved = move_slots(self.x, self.n_segments, self.fold, self.mode)
        return self.x

    def __exit__(self, *exc) -> None:
        put_back(self.x, *self.moved)
        self.version.__exit__(*exc)


def _shift_back_in_place(grad: Tensor, n_segments: int, fold: int, mode: str) -> Tensor:
    if not (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)):
        grad = grad.contiguous()
    move_slots(grad, n_segments, fold, mode, reverse=True)
    return grad


class _ShiftedConv(torch.autograd.Function):
    """``conv2d(shift(x), weight, bias, ...)`` with ``x``'s slots moved in place, in both passes."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, shift: tuple, conv: tuple) -> Tensor:
        with _SlotsMoved(x, *shift) as shifted:
            out = F.conv2d(shifted, weight, bias, *conv)
        ctx.save_for_backward(x, weight)
        ctx.shift, ctx.conv, ctx.has_bias = shift, conv, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return (*_differentiable_backward(ctx, grad, x, weight), None, None)
        n_segments, fold, mode = ctx.shift
        with _SlotsMoved(x, n_segments, fold, mode) as shifted:
            grad_x, grad_w, grad_b = _conv_backward(ctx, grad, shifted, weight)
        if grad_x is not None:
            grad_x = _shift_back_in_place(grad_x, n_segments, fold, mode)
        return grad_x, grad_w, grad_b, None, None


def _conv_backward(ctx, grad: Tensor, shifted: Tensor, weight: Tensor):
    """The conv's gradients for what the forward was asked for: input, weight, bias (None where not)."""
    stride, padding, dilation, groups = ctx.conv
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    return torch.ops.aten.convolution_backward(grad, shifted, weight, [weight.shape[0]] if ctx.has_bias else None,
                                               stride, padding, dilation, False, [0, 0], groups, mask)


def _differentiable_backward(ctx, grad: Tensor, x: Tensor, weight: Tensor):
    """The backward as differentiable ops on a shifted copy (double backward, gradient penalties)."""
    n_segments, fold, mode = ctx.shift
    shape = list(x.shape)
    clips = [shape[0] // n_segments, n_segments, *shape[1:]]
    shifted = _shift_copy(x.reshape(clips).contiguous(), 2, fold, mode, reverse=False).reshape(shape)
    grad_x, grad_w, grad_b = _conv_backward(ctx, grad, shifted, weight)
    if grad_x is not None:
        grad_x = _shift_copy(grad_x.reshape(clips).contiguous(), 2, fold, mode, reverse=True).reshape(shape)
    return grad_x, grad_w, grad_b


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _fusable(x: Tensor, shift: TemporalShift, weight: Tensor, padding) -> bool:
    """In-place use of ``x`` is safe and pays: a converted network's train forward, dense ``x``.

    Recording means grad mode, a converted network's forward and no saved-tensor hooks of the
    caller (the same gate as the recompute scope: ``net.recompute_shifts = False`` turns this
    off too). Autocast would convolve a cast copy, so it falls back as well, and so does a shift
    module replaced by another kind (whose semantics the unit does not know).
    """
    return (type(shift).forward is TemporalShift.forward and recording() and not in_graph_capture()
            and not torch.is_autocast_enabled(x.device.type) and shift.channel_dim == 1
            and x.dim() == 4 and weight.dim() == 4 and not isinstance(padding, str)
            and owns_dense_memory(x) and not hasattr(x, _SWAPPED))


def shifted_conv2d(x: Tensor, shift: TemporalShift, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                   dilation=1, groups=1) -> Tensor:
    """``F.conv2d(shift(x), weight, bias, ...)`` for a train graph: one autograd unit, no shifted copy.

    Args:
        x: the block input, ``(N*T, C, H, W)``; it is the same tensor when this returns.
        shift: the site's :class:`TemporalShift` (its settings are read at every call).
        weight, bias, stride, padding, dilation, groups: as for :func:`torch.nn.functional.conv2d`.

    Example:
        >>> from tsm_surgery import TemporalShift
        >>> shift, conv = TemporalShift(n_segments=4), torch.nn.Conv2d(16, 8, 3, padding=1)
        >>> x = torch.randn(8, 16, 5, 5)
        >>> torch.equal(shifted_conv2d(x, shift, conv.weight, conv.bias, padding=1), conv(shift(x)))
        True
    """
    if isinstance(x, fx.Proxy):
        return _record(x, shifted_conv2d, (shift, weight, bias, stride, padding, dilation, groups))
    if not _fusable(x, shift, weight, padding):
        return _unfused(lambda t: F.conv2d(t, weight, bias, stride, padding, dilation, groups), shift(x))
    _check_input(x, shift.n_segments, shift.shift_div, 1)
    fold = x.shape[1] // shift.shift_div
    return _ShiftedConv.apply(x, weight, bias, (shift.n_segments, fold, _mode(shift.direction, shift.uni_slot)),
                              (_pair(stride), _pair(padding), _pair(dilation), groups))


def shifted_conv_module(x: Tensor, shift: TemporalShift, conv: nn.Conv2d) -> Tensor:
    """``conv(shift(x))`` for a train graph, as :func:`shifted_conv2d`; a conv with hooks runs as a module."""
    if isinstance(x, fx.Proxy):
        return _record(x, shifted_conv_module, (shift, conv))
    if conv._forward_hooks or conv._forward_pre_hooks or nn.modules.module._global_forward_hooks \
            or nn.modules.module._global_forward_pre_hooks:
        return _unfused(conv, shift(x))  # hooks registered after convert() run, with the shifted input
    return shifted_conv2d(x, shift, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _unfused(conv, shifted: Tensor) -> Tensor:
    """``conv(shifted)`` as at a site without the unit: the saved shifted copy becomes a recipe."""
    opened = open_site_hooks()
    try:
        return conv(shifted)
    finally:
        close_site_hooks(opened)


def _record(x: fx.Proxy, fn, args: tuple) -> fx.Proxy:
    """Re-tracing a converted graph (copy, pickle): the call stays one node, modules as ``get_attr``."""
    tracer = x.tracer
    assert isinstance(tracer, fx.Tracer)
    paths = {id(m): name for name, m in tracer.root.named_modules()}
    nodes = tuple(tracer.create_proxy("get_attr", paths[id(a)], (), {}) if isinstance(a, nn.Module) else a
                  for a in args)
    return tracer.create_proxy("call_function", fn, (x, *nodes), {})

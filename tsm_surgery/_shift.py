"""The temporal shift op and its module form.

A clip batch is ``(N*T, C, ...)`` with the ``T`` frames of each clip contiguous. With
``fold = C // shift_div``:

* ``"bi"``: channels ``[0, fold)`` of frame t come from frame t+1 (zeros at the last frame),
  channels ``[fold, 2*fold)`` from frame t-1 (zeros at the first frame); the rest stay.
* ``"uni"``: one slot moves, from frame t-1 (zeros at the first frame), so frame t never sees a
  later frame. ``uni_slot="past"`` (the default) moves ``[fold, 2*fold)``, the slot a ``"bi"``
  network reads from the past, so a bi-trained model keeps its past slot; ``uni_slot="first"``
  moves ``[0, fold)``, the layout of the paper's online demo.

Three forms compute the same tensor, each where it is cheapest:

* eager: strided copies into one uninitialised output, every element written once, with an
  autograd function that saves nothing (:func:`_shift_copy`);
* TorchScript, tracing and export: views and one ``torch.cat`` per slot, never slices assigned
  into a zero tensor, the form that breaks ONNX/TensorRT export of the paper's shift (upstream
  temporal-shift-module issues #77, #103, #181) (:func:`_shift_frames`);
* ``torch.compile``: a select over frame-rolled batches, which inductor fuses into the kernel
  that produces the input (:func:`_shift_selecting`).
"""

import math
import numbers

import torch
from torch import Tensor, nn

from ._in_place import SLOTS, channels_last_4d, move_slots, put_back
from ._recompute import in_graph_capture, mark_recomputable, recording

__all__ = ["temporal_shift", "TemporalShift", "DIRECTIONS", "UNI_SLOTS", "restore_slots"]

DIRECTIONS = ("bi", "uni")
UNI_SLOTS = ("past", "first")  # which channels a "uni" shift moves: [fold, 2*fold) or [0, fold)


def check_int(name: str, value, least: int, meaning: str) -> int:
    """``value`` as an int, or ValueError naming ``name``: bools, floats, None and NaN are refused, never truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        shown = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)
        raise ValueError(f"{name} must be an int ({meaning}), got {shown} of type {type(value).__name__}. "
                         f"Hint: pass a whole number such as {name}={max(least, 8)}.")
    if value < least:
        raise ValueError(f"{name} must be at least {least} ({meaning}), got {value}.")
    return int(value)


def check_shift_args(n_segments: int, shift_div: int, direction: str, uni_slot: str = "past") -> None:
    """Raises ValueError for arguments no clip can satisfy, naming the argument."""
    if direction not in DIRECTIONS:
        raise ValueError(
            f"direction={direction!r} is not one of {DIRECTIONS}: 'bi' mixes past and future "
            "frames (offline), 'uni' only the past (online/streaming)."
        )
    if uni_slot not in UNI_SLOTS:
        raise ValueError(f"uni_slot={uni_slot!r} is not one of {UNI_SLOTS}: 'past' moves channels [fold, 2*fold) "
                         "(a bi network's past slot), 'first' channels [0, fold) (the paper's online demo).")
    if uni_slot != "past" and direction != "uni":
        raise ValueError(f"uni_slot={uni_slot!r} applies to direction='uni' only; direction={direction!r} moves "
                         "both slots. Hint: convert(..., direction='uni', uni_slot=...).")
    check_int("n_segments", n_segments, 1, "frames per clip")
    check_int("shift_div", shift_div, 2, "1/shift_div of the channels move each way")


def check_int_dim(channel_dim) -> int:
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, numbers.Integral):
        raise ValueError(f"channel_dim must be an int (1 for NCHW, -1 for NHWC or tokens), got {channel_dim!r}.")
    return int(channel_dim)


def _mode(direction: str, uni_slot: str) -> str:
    """The one string the kernels switch on: "bi", "uni" (the past slot) or "uni_first"."""
    return "uni_first" if direction == "uni" and uni_slot == "first" else direction


def _check_input(x: Tensor, n_segments: int, shift_div: int, channel_dim: int) -> None:
    if torch.jit.is_tracing():
        return  # a traced graph would keep the check's outcome as a constant, not the check
    if x.dim() < 2:
        raise ValueError(f"temporal_shift needs a (N*T, C, ...) or (N*T, ..., C) tensor, got shape {list(x.shape)}.")
    batch = x.shape[0]
    if batch % n_segments != 0:
        raise ValueError(
            f"batch {batch} is not a multiple of n_segments={n_segments}. The input must hold whole "
            f"clips with their frames folded into the batch: (N*T, C, H, W) with T={n_segments}. "
            "If you passed a (N, C, T, H, W) or (N, T, C, H, W) tensor, reshape it to "
            "(N*T, C, H, W) first; if the clip length changed, set n_segments on the converted model."
        )
    channels = x.shape[channel_dim]
    if channels < shift_div:
        raise ValueError(
            f"{channels} channels (dim {channel_dim} of shape {list(x.shape)}) cannot be split into "
            f"1/{shift_div} slots: lower shift_div or skip this site (convert(..., select=...))."
        )


def _shift_frames(v: Tensor, channel_dim: int, fold: int, direction: str) -> Tensor:
    """Shifts a (N, T, ...) view with views and ``torch.cat`` only; ``channel_dim`` indexes that 5D view.

    This functional form is the one TorchScript, tracing/ONNX export and ``torch.compile`` see:
    it has no in-place writes, so exporters emit plain Slice/Concat and inductor fuses it.
    ``direction`` is a kernel mode (see :func:`_mode`).
    """
    frames = v.shape[1]
    channels = v.shape[channel_dim]
    past = v.narrow(channel_dim, 0 if direction == "uni_first" else fold, fold)
    first = torch.zeros_like(past.narrow(1, 0, 1))
    from_past = torch.cat([first, past.narrow(1, 0, frames - 1)], dim=1)
    if direction == "uni_first":
        return torch.cat([from_past, v.narrow(channel_dim, fold, channels - fold)], dim=channel_dim)
    rest = v.narrow(channel_dim, 2 * fold, channels - 2 * fold)
    if direction == "uni":
        return torch.cat([v.narrow(channel_dim, 0, fold), from_past, rest], dim=channel_dim)
    future = v.narrow(channel_dim, 0, fold)
    from_future = torch.cat([future.narrow(1, 1, frames - 1), first], dim=1)
    return torch.cat([from_future, from_past, rest], dim=channel_dim)


def _product(sizes: list[int]) -> int:
    """``math.prod`` for TorchScript, which does not compile it."""
    total = 1
    for size in sizes:
        total *= size
    return total


def _shift_flat_clips(x: Tensor, n_segments: int, fold: int, direction: str, channel_dim: int) -> Tensor:
    """The views + cat form on a clip view of rank 4 at most, for exporters and mobile runtimes.

    NNAPI, CoreML and MNN take tensors of rank 4 at most, and a ``(N, T, C, H, W)`` view would
    put a 5-D value around every shift of an exported graph. The frames of a clip are contiguous
    in the batch, so the dimensions before and after the channels can be merged: ``(N*T, C, H, W)``
    is shifted as ``(N, T, C, H*W)``, ``(N*T, L, C)`` tokens as ``(N, T, L, C)``.
    """
    shape: list[int] = list(x.shape)
    view: list[int] = [shape[0] // n_segments, n_segments]
    if channel_dim > 1:
        view.append(_product(shape[1:channel_dim]))
    view.append(shape[channel_dim])
    if channel_dim < len(shape) - 1:
        view.append(_product(shape[channel_dim + 1:]))
    out = _shift_frames(x.reshape(view), 3 if channel_dim > 1 else 2, fold, direction)
    return out.reshape(shape)


def _shift_selecting(x: Tensor, n_segments: int, fold: int, direction: str, channel_dim: int) -> Tensor:
    """The form ``torch.compile`` sees: one elementwise select between ``x`` and its neighbour frames.

    Inductor on CPU lowers every ``cat`` to a copy kernel whose output it lays out contiguous,
    while it runs the convolutions channels-last; with the ``cat`` form each shift added two
    layout transposes, and compiled ResNet-50 ran at 1.3-1.4x the compiled 2D network. A
    ``where`` over the batch rolled by one frame is a single pointwise node: inductor fuses it
    into the kernel that produces ``x`` and writes it in the layout its consumer wants. Rolling
    the whole ``(N*T)`` batch crosses clip boundaries only at the frames the mask zeroes.
    """
    batch, channels = x.shape[0], x.shape[channel_dim]
    frame = (torch.arange(batch, device=x.device) % n_segments).view([batch] + [1] * (x.dim() - 1))
    channel_shape = [1] * x.dim()
    channel_shape[channel_dim] = channels
    channel = torch.arange(channels, device=x.device).view(channel_shape)
    from_past = torch.where(frame != 0, x.roll(1, 0), 0.0)
    if direction == "uni_first":
        return torch.where(channel < fold, from_past, x)
    if direction == "uni":
        return torch.where((channel >= fold) & (channel < 2 * fold), from_past, x)
    from_future = torch.where(frame != n_segments - 1, x.roll(-1, 0), 0.0)
    return torch.where(channel < fold, from_future, torch.where(channel < 2 * fold, from_past, x))


def _move_slot(src: Tensor, dst: Tensor, offset: int) -> None:
    """Writes slot ``src`` of a ``(N, T, ...)`` view into ``dst`` one frame along ``T`` (``offset`` +1: frame
    ``t`` reads ``t+1``), and zeros the frame at the clip end that has nothing to read."""
    frames = src.shape[1]
    if frames > 1:
        read_from, write_to = (1, 0) if offset > 0 else (0, 1)
        dst.narrow(1, write_to, frames - 1).copy_(src.narrow(1, read_from, frames - 1))
    dst.narrow(1, frames - 1 if offset > 0 else 0, 1).zero_()


def _shift_copy(v: Tensor, channel_dim: int, fold: int, direction: str, reverse: bool) -> Tensor:
    """Eager form: one uninitialised output and strided copies, no zero-filled full tensor.

    With channels outside the innermost dimension (NCHW) every output element is written
    exactly once (copied, or zeroed at the clip ends): one read and one write of the tensor,
    the least an out-of-place shift can move. With channels innermost (channels_last, tokens)
    each slot is a short run per pixel and copying the unmoved channels run by run is slow, so
    the whole tensor is copied in one contiguous pass and only the moving slots are rewritten
    (a third less time than region by region on ResNet-50's channels_last sites).

    Args:
        v: a dense ``(N, T, ...)`` view of the clips.
        channel_dim: the channel dimension of ``v``.
        fold: channels per moving slot.
        direction: the kernel mode, ``"bi"``, ``"uni"`` or ``"uni_first"`` (see :func:`_mode`).
        reverse: shift the other way (the backward of the forward shift).
    """
    channels = v.shape[channel_dim]
    whole_first = channel_dim == v.dim() - 1
    out = v.clone() if whole_first else torch.empty_like(v)
    for slot, offset in SLOTS[(direction, reverse)]:
        src = v.narrow(channel_dim, slot * fold, fold)
        dst = out.narrow(channel_dim, slot * fold, fold)
        _move_slot(src, dst, offset)
    if whole_first:
        return out
    slots = [slot for slot, _ in SLOTS[(direction, reverse)]]
    lo, hi = min(slots) * fold, (max(slots) + 1) * fold  # the moving slots are adjacent
    if lo:
        out.narrow(channel_dim, 0, lo).copy_(v.narrow(channel_dim, 0, lo))
    out.narrow(channel_dim, hi, channels - hi).copy_(v.narrow(channel_dim, hi, channels - hi))
    return out


_SWAPPED = "_tsm_swapped_slots"  # set on a tensor whose slots a shift moved in place: (scratch, their view)


def _can_shift_in_place(x: Tensor) -> bool:
    """In-place use of ``x`` is safe: no autograd, not a view of another tensor, dense memory."""
    return not (torch.is_grad_enabled() or x.requires_grad) and owns_dense_memory(x)


def owns_dense_memory(x: Tensor) -> bool:
    """``x`` is writable, dense (contiguous or channels_last) and not a view of another tensor."""
    if x._base is not None:
        return False
    if x.is_inference() and not torch.is_inference_mode_enabled():
        return False  # torch refuses in-place writes to inference tensors outside inference mode
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def restore_slots(x: Tensor) -> None:
    """Puts back the slots a shift with ``swap=True`` moved in place in ``x`` (a no-op when it copied).

    A converted network's eval graph calls it right after the one layer that reads the shift's
    result, so every later reader of ``x`` (the shortcut) sees it bit for bit as it was.
    """
    if isinstance(x, torch.fx.Proxy):  # re-tracing a converted graph: keep the node
        x.tracer.create_proxy("call_function", restore_slots, (x,), {})
        return None
    if in_graph_capture():
        return None
    swapped = getattr(x, _SWAPPED, None)
    if swapped is None:
        return None
    delattr(x, _SWAPPED)
    put_back(x, *swapped)
    return None


def _swap_shift(x: Tensor, n_segments: int, fold: int, mode: str, channel_dim: int) -> Tensor:
    setattr(x, _SWAPPED, move_slots(x, n_segments, fold, mode, channel_dim))
    return x


class _ShiftFunction(torch.autograd.Function):
    """The shift with a backward that is the reverse shift of the gradient; saves no tensor."""

    @staticmethod
    def forward(ctx, v: Tensor, channel_dim: int, fold: int, direction: str) -> Tensor:
        ctx.channel_dim, ctx.fold, ctx.direction = channel_dim, fold, direction
        return _shift_copy(v, channel_dim, fold, direction, reverse=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not grad.is_contiguous():
            grad = grad.contiguous()
        return _shift_copy(grad, ctx.channel_dim, ctx.fold, ctx.direction, reverse=True), None, None, None


def _eager_shift(v: Tensor, channel_dim: int, fold: int, direction: str) -> Tensor:
    if torch.is_grad_enabled() and v.requires_grad:
        return _ShiftFunction.apply(v, channel_dim, fold, direction)
    return _shift_copy(v, channel_dim, fold, direction, reverse=False)


# Scripted, traced, exported or compiled: use the views + cat form.
_use_functional_form = in_graph_capture


def _compiling_not_exporting() -> bool:
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def _temporal_shift(x: Tensor, n_segments: int, shift_div: int, direction: str, channel_dim: int,
                    uni_slot: str = "past", recompute: bool = True, swap: bool = False) -> Tensor:
    source, original_dim = x, channel_dim
    if channel_dim < -x.dim() or channel_dim >= x.dim():
        raise ValueError(f"channel_dim={channel_dim} is out of range for a tensor of shape {list(x.shape)} "
                         f"(rank {x.dim()}): channels are dim 1 (NCHW) or -1 (NHWC, tokens).")
    channel_dim = channel_dim % x.dim()
    _check_input(x, n_segments, shift_div, channel_dim)
    fold = x.shape[channel_dim] // shift_div
    mode = _mode(direction, uni_slot)
    if _compiling_not_exporting():
        return _shift_selecting(x, n_segments, fold, mode, channel_dim)
    if not torch.jit.is_scripting():
        if swap and not _use_functional_form() and _can_shift_in_place(x) and not hasattr(x, _SWAPPED):
            return _swap_shift(x, n_segments, fold, mode, channel_dim)
    # channels_last: shift the (N*T, H, W, C) view, whose memory is contiguous, so the result
    # keeps the caller's memory format without an extra copy.
    channels_last = channels_last_4d(x, channel_dim)
    if channels_last:
        x = x.permute(0, 2, 3, 1)
        channel_dim = 3
    shape: list[int] = list(x.shape)
    if torch.jit.is_scripting():  # a literal check: TorchScript then skips compiling the eager branch
        out = _shift_flat_clips(x, n_segments, fold, mode, channel_dim)
    elif _use_functional_form():
        out = _shift_flat_clips(x, n_segments, fold, mode, channel_dim)
    else:
        clips = x.reshape([shape[0] // n_segments, n_segments] + shape[1:])
        out = _eager_shift(clips.contiguous(), channel_dim + 1, fold, mode).reshape(shape)
    out = out.permute(0, 3, 1, 2) if channels_last else out
    if not torch.jit.is_scripting():
        if recompute and recording() and out.requires_grad and not _use_functional_form():
            # Inside a recompute scope: a consumer that saves this output for its backward
            # (the branch's first conv saves its input) stores how to rebuild it instead.
            mark_recomputable(out, source, _temporal_shift, n_segments, shift_div, direction, original_dim, uni_slot)
    return out


def temporal_shift(
    x: Tensor, n_segments: int, shift_div: int = 8, direction: str = "bi", channel_dim: int = 1,
    uni_slot: str = "past",
) -> Tensor:
    """Shifts 1/``shift_div`` of the channels one frame along time.

    Args:
        x: clips with frames folded into the batch: ``(N*T, C, H, W)`` (contiguous or
            channels_last) or tokens ``(N*T, L, C)`` with ``channel_dim=-1``.
        n_segments: frames per clip, ``T``.
        shift_div: ``1/shift_div`` of the channels move each way.
        direction: ``"bi"`` (past and future, offline) or ``"uni"`` (past only, online).
        channel_dim: the channel dimension of ``x`` (in range for its rank; never wrapped).
        uni_slot: with ``"uni"``, which channels move from frame t-1: ``"past"`` (the default,
            ``[fold, 2*fold)``, a bi network's past slot) or ``"first"`` (``[0, fold)``, the
            layout of the paper's online demo).

    Returns:
        A new tensor of ``x``'s shape; ``x`` is not modified.

    Raises:
        ValueError: the batch is not a multiple of ``n_segments`` or there are fewer channels
            than ``shift_div``.

    Example:
        >>> x = torch.arange(8.).reshape(2, 4, 1, 1)    # 2 frames, 4 channels
        >>> temporal_shift(x, n_segments=2, shift_div=4).flatten(1)
        tensor([[4., 0., 2., 3.],
                [0., 1., 6., 7.]])

    Under ``torch.fx`` symbolic tracing the call is recorded as one node.
    """
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy(
            "call_function", temporal_shift, (x,),
            {"n_segments": n_segments, "shift_div": shift_div, "direction": direction, "channel_dim": channel_dim,
             "uni_slot": uni_slot},
        )
    check_shift_args(n_segments, shift_div, direction, uni_slot)
    check_int_dim(channel_dim)
    return _temporal_shift(x, n_segments, shift_div, direction, channel_dim, uni_slot)


class TemporalShift(nn.Module):
    """:func:`temporal_shift` as a module with no parameters and no buffers.

    ``convert`` inserts one per shifted site; its attributes can be changed after conversion
    (for instance ``n_segments`` when test clips are longer than training clips). ``recompute``
    is False where ``convert`` found the shift's input written in place after the shift: its
    output is then saved for backward rather than rebuilt (see ``recompute_shifts``).

    Example:
        >>> shift = TemporalShift(n_segments=8, shift_div=8, direction="uni")
        >>> shift(torch.randn(16, 64, 7, 7)).shape
        torch.Size([16, 64, 7, 7])
    """

    def __init__(self, n_segments: int, shift_div: int = 8, direction: str = "bi", channel_dim: int = 1,
                 uni_slot: str = "past"):
        super().__init__()
        check_shift_args(n_segments, shift_div, direction, uni_slot)
        self.n_segments = int(n_segments)
        self.shift_div = int(shift_div)
        self.direction = direction
        self.channel_dim = check_int_dim(channel_dim)
        self.uni_slot = uni_slot
        self.recompute = True

    def forward(self, x: Tensor, swap: bool = False) -> Tensor:
        """``swap=True`` (a converted eval graph's sites, see ``_fast_paths``) may move the slots of
        ``x`` in place and return ``x`` itself; :func:`restore_slots` must then run on ``x`` right
        after the one layer that reads the result. Without autograd only; otherwise a copy."""
        return _temporal_shift(x, self.n_segments, self.shift_div, self.direction, self.channel_dim, self.uni_slot,
                               self.recompute, swap)

    @staticmethod
    def restore(x: Tensor) -> None:
        """Undoes ``forward(x, swap=True)`` once the one reader of its result has run (see :func:`restore_slots`).

        Example:
            >>> shift, x = TemporalShift(n_segments=2, shift_div=4), torch.arange(8.).reshape(2, 4, 1, 1)
            >>> with torch.no_grad():
            ...     shifted = shift(x, swap=True)          # x itself, its slots moved
            ...     total = shifted.sum()                  # the one reader: 4+0+2+3 + 0+1+6+7
            ...     TemporalShift.restore(x)               # x is as it was
            >>> total.item(), x.flatten().tolist()
            (23.0, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
        """
        restore_slots(x)

    def extra_repr(self) -> str:
        slot = f", uni_slot={self.uni_slot!r}" if self.direction == "uni" else ""
        return (f"n_segments={self.n_segments}, shift_div={self.shift_div}, "
                f"direction={self.direction!r}{slot}, channel_dim={self.channel_dim}"
                + ("" if self.recompute else ", recompute=False"))

"""The shift done in place: a scratch copy of the moving slots, and the strided views that move them.

Eval (``TemporalShift(..., swap=True)``), the training unit of a shift and its conv
(:mod:`._shifted_conv`) and its gradient move the slots of a dense tensor in place instead of
writing a shifted copy. The work per call is a handful of strided copies, so on a fast host the
Python and dispatch cost of building their views weighs as much as the bytes. Everything that
depends only on the tensor's shape and layout is therefore computed once per shape
(:func:`_moves_for`) and each call is four kernels on ``as_strided`` views of the tensor:

* the moving slots into a slot-major scratch ``(N, slots, T, ...)``;
* every slot's shifted frames back from the scratch, all slots in one copy;
* the frame at each slot's clip end that has nothing to read set to zero, in one kernel;
* and, to undo it (:func:`put_back`), the scratch into the slots.
"""

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SLOTS", "move_slots", "put_back", "channels_last_4d"]

# Which frame each moving slot reads, as (first channel in folds, frame offset): +1 reads frame
# t+1 (a shift towards the past), -1 reads frame t-1. The backward of a shift is the shift with
# every offset negated: the op is a permutation of entries with some of them replaced by zeros.
SLOTS = {
    ("bi", False): ((0, 1), (1, -1)),
    ("bi", True): ((0, -1), (1, 1)),
    ("uni", False): ((1, -1),),
    ("uni", True): ((1, 1),),
    ("uni_first", False): ((0, -1),),
    ("uni_first", True): ((0, 1),),
}

_View = tuple[tuple[int, ...], tuple[int, ...], int]  # as_strided's size, stride and storage offset


class _Moves(NamedTuple):
    scratch: tuple[int, ...]  # the scratch's shape, slot-major
    slots: _View  # the moving slots of x, in the scratch's order
    moves: tuple[tuple[_View, _View], ...]  # (into x, from the scratch), one per copy
    zero: _View  # the frames with nothing to read


def channels_last_4d(x: Tensor, channel_dim: int) -> bool:
    """``x`` is a 4-D channels_last tensor with its channels at dim 1 (memory order N, H, W, C)."""
    return (channel_dim == 1 and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


@functools.lru_cache(maxsize=512)
def _moves_for(shape: tuple[int, ...], channels_last: bool, n_segments: int, fold: int, mode: str,
               channel_dim: int, reverse: bool) -> _Moves:
    """The views of one in-place shift of a dense tensor of ``shape`` (channels at ``channel_dim``).

    Memory is read as ``(N, T, A, C, B)``: ``A`` the positions before the channels in memory
    order (H*W for channels_last, tokens for ``(N*T, L, C)``), ``B`` those after (H*W for NCHW).
    A frame is ``F = A*C*B`` elements, a slot ``A*fold*B``. Slots whose copies cannot share one
    view with positive strides (the gradient of a ``"bi"`` shift) are copied one by one.
    """
    if channels_last:
        inner, channels, outer = shape[2] * shape[3], shape[1], 1
    else:
        inner, channels, outer = math.prod(shape[1:channel_dim]), shape[channel_dim], math.prod(shape[channel_dim + 1:])
    clips, frames = shape[0] // n_segments, n_segments
    frame, run = inner * channels * outer, fold * outer
    slot = inner * run  # elements of one slot of one frame, as the scratch stores it
    slots = SLOTS[(mode, reverse)]
    first = min(s for s, _ in slots)
    in_x, in_scratch = (channels * outer, 1), (run, 1)  # strides of (A, fold*B) in x and in the scratch
    scratch = (clips, len(slots), frames, inner, run)
    slot_view = (scratch, (frames * frame, run, frame, *in_x), first * run)
    # slot i reads frames [1, T) into [0, T-1) (offset +1) or [0, T-1) into [1, T) (offset -1)
    into_x = [(0 if o > 0 else frame) + s * run for s, o in slots]
    from_scratch = [i * frames * slot + (slot if o > 0 else 0) for i, (_, o) in enumerate(slots)]
    moves: tuple[tuple[_View, _View], ...]
    if len(slots) == 2 and into_x[1] > into_x[0] and from_scratch[1] > from_scratch[0]:  # one copy for both
        both = (clips, 2, frames - 1, inner, run)
        moves = (((both, (frames * frame, into_x[1] - into_x[0], frame, *in_x), into_x[0]),
                  (both, (frames * slot * 2, from_scratch[1] - from_scratch[0], slot, *in_scratch),
                   from_scratch[0])),)
    else:
        moved = (clips, frames - 1, inner, run)
        moves = tuple(((moved, (frames * frame, frame, *in_x), dst),
                       (moved, (frames * slot * len(slots), slot, *in_scratch), src))
                      for dst, src in zip(into_x, from_scratch))
    if frames == 1:
        moves = ()
    ends = sorted((frames - 1 if o > 0 else 0) * frame + s * run for s, o in slots)
    zero = ((clips, len(ends), inner, run), (frames * frame, ends[-1] - ends[0] or 1, *in_x), ends[0])
    return _Moves(scratch, slot_view, moves, zero)


def _at(x: Tensor, view: _View) -> Tensor:
    size, stride, offset = view
    return x.as_strided(size, stride, x.storage_offset() + offset)


def move_slots(x: Tensor, n_segments: int, fold: int, mode: str, channel_dim: int = 1,
               reverse: bool = False) -> tuple[Tensor, _View]:
    """Shifts the moving slots of the dense clip batch ``x`` in place.

    Args:
        x: ``(N*T, ...)``, contiguous or (4-D, ``channel_dim=1``) channels_last, not a view.
        n_segments: frames per clip ``T``.
        fold: channels per slot.
        mode: the kernel mode, ``"bi"``, ``"uni"`` or ``"uni_first"``.
        channel_dim: the channel dimension of ``x``, non-negative.
        reverse: shift the other way (a gradient).

    Returns:
        The scratch (the slots as they were) and the view of ``x`` it came from, for :func:`put_back`.

    Example:
        >>> x = torch.arange(8.).reshape(2, 4, 1, 1)    # 2 frames, 4 channels, fold 1
        >>> moved = move_slots(x, n_segments=2, fold=1, mode="bi")
        >>> x.flatten().tolist()                         # as temporal_shift(x, 2, shift_div=4)
        [4.0, 0.0, 2.0, 3.0, 0.0, 1.0, 6.0, 7.0]
        >>> put_back(x, *moved)
        >>> x.flatten().tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    moves = _moves_for(tuple(x.shape), channels_last_4d(x, channel_dim), n_segments, fold, mode, channel_dim,
                       reverse)
    scratch = torch.empty(moves.scratch, dtype=x.dtype, device=x.device)
    scratch.copy_(_at(x, moves.slots))
    for into_x, from_scratch in moves.moves:
        _at(x, into_x).copy_(_at(scratch, from_scratch))
    _at(x, moves.zero).zero_()
    return scratch, moves.slots


def put_back(x: Tensor, scratch: Tensor, slots: _View) -> None:
    """Undoes :func:`move_slots`: ``x`` is bit for bit as it was before it."""
    _at(x, slots).copy_(scratch)

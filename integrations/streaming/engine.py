"""The model step of the frame loop, and the protocol another backend implements to plug in.

The loop calls the model exactly once per tick, through an object with two methods::

    class StepEngine(Protocol):
        def init_state(self, batch_size: int) -> dict[str, Tensor]: ...
        def step(self, frames: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...

* ``frames``: ``(N, C, H, W)`` float, one preprocessed frame per stream; ``N`` changes from
  tick to tick (the streams that have a frame ready), from 1 to the number of streams.
* ``state``: a dict of tensors whose first dimension is the batch (row ``i`` belongs to stream
  ``i`` of ``frames``). The loop owns it: it slices rows out when a stream ends, concatenates a
  fresh ``init_state(1)`` for a new or reset stream, and gathers the rows of the streams in this
  tick. So the engine needs no notion of streams or slots, and ``step`` must not keep state of its
  own: rows of the same stream must give the same output whatever batch they run in.
* returns ``(logits, new_state)``: ``(N, num_classes)`` scores and the state for the next tick.

:class:`tsm_surgery.OnlineTSM` already has this form (``init_state``/``step``): :class:`TorchEngine`
adds the frame shape, dtype and an optional head. A runtime whose caches are numpy arrays (ONNX
Runtime, OpenVINO, ExecuTorch) converts at its boundary (``torch.from_numpy``, no copy on CPU);
one with a fixed batch pads ``frames`` and the state rows to its batch and slices the result.

Example:
    >>> engine = TorchEngine(online, frame_shape=(3, 64, 64))        # doctest: +SKIP
    >>> state = engine.init_state(2)                                   # doctest: +SKIP
    >>> logits, state = engine.step(torch.zeros(2, 3, 64, 64), state)  # doctest: +SKIP
"""

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

import tsm_surgery

__all__ = ["StepEngine", "TorchEngine", "State"]

State = dict[str, Tensor]


@runtime_checkable
class StepEngine(Protocol):
    """What the frame loop calls: see the module docstring for the contract."""

    def init_state(self, batch_size: int) -> State: ...

    def step(self, frames: Tensor, state: State) -> tuple[Tensor, State]: ...


class TorchEngine:
    """A PyTorch :class:`tsm_surgery.OnlineTSM` (and an optional head on its output) as a :class:`StepEngine`.

    Args:
        online: the online network.
        frame_shape: ``(C, H, W)`` of the preprocessed frames (cache shapes depend on it).
        dtype: frames' and caches' dtype (default: the network's).
        head: applied to the network's output, e.g. an MMAction2 head on one-frame features.
    """

    def __init__(self, online: tsm_surgery.OnlineTSM, frame_shape: tuple[int, int, int],
                 dtype: torch.dtype | None = None, head: Callable[[Tensor], Tensor] | None = None):
        if not isinstance(online, tsm_surgery.OnlineTSM):
            raise TypeError(f"TorchEngine runs a tsm_surgery.OnlineTSM, got {type(online).__name__}; "
                            "hint: tsm_surgery.to_online(tsm_surgery.convert(model, direction='uni')).")
        self.online, self.frame_shape, self.dtype, self.head = online, tuple(frame_shape), dtype, head

    def init_state(self, batch_size: int) -> State:
        return self.online.init_state(batch_size, dtype=self.dtype, frame_shape=self.frame_shape)

    @torch.no_grad()
    def step(self, frames: Tensor, state: State) -> tuple[Tensor, State]:
        out, state = self.online.step(frames, state)
        return (out if self.head is None else self.head(out)), state

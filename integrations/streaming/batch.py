"""Many streams through one online network, one batched step per tick.

:class:`StreamBatch` keeps one state row per stream. Each :meth:`~StreamBatch.step` gathers the
rows of the streams that were fed a frame, runs the engine once on all of them, and scatters the
new rows back, so no stream waits for another and a stream that was not fed keeps its state. A
stream added later, or reset, starts from the engine's ``init_state(1)``: the state before the
first frame. In eval mode every row is computed on its own, so each stream's outputs equal a run
of that stream alone (up to the float differences of a batched convolution).

Example:
    >>> batch = StreamBatch(engine)                      # doctest: +SKIP
    >>> a, b = batch.add("cam0"), batch.add("cam1")      # doctest: +SKIP
    >>> batch.feed(a, frame_a); batch.feed(b, frame_b)   # doctest: +SKIP
    >>> logits = batch.step()                            # {a: (classes,), b: (classes,)}  # doctest: +SKIP
    >>> batch.remove(a)                                  # doctest: +SKIP
"""

import itertools

import torch
from torch import Tensor

from .engine import State, StepEngine

__all__ = ["StreamBatch"]


class StreamBatch:
    """Streams sharing one :class:`~.engine.StepEngine`; a Python API for users who bring their own frames.

    Args:
        engine: ``init_state(batch)`` and ``step(frames, state)``; a :class:`~.engine.TorchEngine`
            for an ``OnlineTSM``.
    """

    def __init__(self, engine: StepEngine):
        self.engine = engine
        self.names: dict[int, str] = {}
        self._states: dict[int, State] = {}
        self._pending: dict[int, Tensor] = {}
        self._latest: dict[int, Tensor] = {}
        self._ids = itertools.count()

    def add(self, name: str | None = None) -> int:
        """Starts a stream from the state before its first frame; returns its id."""
        stream = next(self._ids)
        self.names[stream] = name if name is not None else f"stream{stream}"
        self._states[stream] = self.engine.init_state(1)
        return stream

    def remove(self, stream: int) -> None:
        """Ends a stream and frees its state; a frame fed and not stepped is dropped."""
        self._check(stream)
        for table in (self.names, self._states, self._pending, self._latest):
            table.pop(stream, None)

    def reset(self, stream: int) -> None:
        """Starts ``stream`` again (a new video, a reconnected source)."""
        self._check(stream)
        self._states[stream] = self.engine.init_state(1)
        self._latest.pop(stream, None)

    def feed(self, stream: int, frame: Tensor) -> None:
        """Gives ``stream`` its next preprocessed frame, ``(C, H, W)`` or ``(1, C, H, W)``, for :meth:`step`."""
        self._check(stream)
        if stream in self._pending:
            raise ValueError(f"stream {self.names[stream]!r} already has a frame for this step; call step() first.")
        self._pending[stream] = frame if frame.dim() == 4 else frame[None]

    def step(self) -> dict[int, Tensor]:
        """Runs the engine once on every fed stream; returns stream id -> ``(num_classes,)`` logits."""
        streams = list(self._pending)
        if not streams:
            return {}
        frames = torch.cat([self._pending.pop(s) for s in streams])
        rows = [self._states[s] for s in streams]
        state = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if len(rows) > 1 else rows[0]
        logits, new_state = self.engine.step(frames, state)
        out = {}
        for i, stream in enumerate(streams):
            self._states[stream] = {k: v[i:i + 1] for k, v in new_state.items()}
            out[stream] = self._latest[stream] = logits[i]
        return out

    def results(self, stream: int) -> Tensor | None:
        """The latest logits of ``stream`` (``None`` before its first step)."""
        self._check(stream)
        return self._latest.get(stream)

    @property
    def streams(self) -> list[int]:
        return list(self.names)

    def _check(self, stream: int) -> None:
        if stream not in self.names:
            raise KeyError(f"no stream {stream}; running streams: {sorted(self.names)}.")

"""The frame loop: sources in, one batched model step per tick, post-processing and outputs out.

Each tick takes the next frame of every stream that has one (a stream never waits for another),
preprocesses them, runs :class:`~.batch.StreamBatch.step` (one engine call for all of them),
post-processes each stream's scores and hands the results to the outputs (printed lines, JSON
lines, events, annotated videos). Source messages are handled between ticks: a note is said on
stderr, a reconnection resets the stream's state and post-processing, an end or an error ends
the stream (said on stderr) while the others go on.

Timing per frame: ``decode`` (in the source's thread), ``preprocess``, ``step`` (the batched
call, counted for every stream in it), ``post``; and, for a stream read in real time, the lag:
how long after its due time on the source's clock the frame's result was ready.
"""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .batch import StreamBatch
from .post import Event, PostProcess
from .sources import Source, SourceFrame, SourceMessage

__all__ = ["FrameLoop", "FrameResult", "StreamStats", "percentile"]

PARTS = ("decode", "preprocess", "step", "post")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; ``nan`` for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class StreamStats:
    """One stream's timings (seconds), kept for the frames after the warm-up."""

    name: str
    frames: int = 0
    timed: dict = field(default_factory=lambda: {part: [] for part in PARTS})
    lag: list = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    dropped: int = 0
    failed: bool = False

    def fps(self) -> float:
        if self.first is None or self.last is None or self.last <= self.first or self.frames < 2:
            return float("nan")
        return (self.frames - 1) / (self.last - self.first)


@dataclass
class FrameResult:
    """What the outputs get for one frame of one stream."""

    stream: str
    frame: SourceFrame
    probs: torch.Tensor
    announced: int | None
    events: list[Event]
    step_s: float
    times: dict
    lag_s: float | None


class FrameLoop:
    """Runs sources through a :class:`StreamBatch` until every stream ends or ``duration_s`` passes.

    Args:
        sources: started or not; the loop starts them.
        batch: the streams' states and the engine.
        preprocess: ``(H, W, 3)`` uint8 -> ``(1, C, H, W)`` tensor.
        make_post: stream name -> its :class:`PostProcess`.
        on_result: called with each :class:`FrameResult`.
        on_end: called with a stream's name and its last events when it ends.
        say: prints one line on stderr.
        warmup: frames per stream left out of the timings.
        duration_s: stop after this many seconds (``None``: when all streams end).
        dtype: the frames' dtype for the model.
        plain: if given, the 2D model timed on the same frames each tick (``--benchmark``).
    """

    def __init__(self, sources: list[Source], batch: StreamBatch, preprocess: Callable, make_post: Callable,
                 on_result: Callable, on_end: Callable, say: Callable[[str], None] | None = None, *,
                 warmup: int = 0, duration_s: float | None = None, dtype: torch.dtype = torch.float32,
                 plain: Callable | None = None):
        self.sources, self.batch, self.preprocess, self.make_post = sources, batch, preprocess, make_post
        self.on_result, self.on_end = on_result, on_end
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.warmup, self.duration_s, self.dtype, self.plain = warmup, duration_s, dtype, plain
        self.stats = {source.name: StreamStats(source.name) for source in sources}
        self.step_times: list[float] = []
        self.plain_times: list[float] = []
        self.ratios: list[float] = []
        self.ticks = 0

    @torch.no_grad()
    def run(self) -> dict[str, StreamStats]:
        wake = self.sources[0].wake if self.sources else None
        active: dict[int, Source] = {}
        posts: dict[int, PostProcess] = {}
        for source in self.sources:
            source.wake = wake
            stream = self.batch.add(source.name)
            active[stream], posts[stream] = source.start(), self.make_post(source.name)
        start = time.perf_counter()
        try:
            while active:
                if self.duration_s is not None and time.perf_counter() - start >= self.duration_s:
                    break
                wake.clear()
                ready = self._collect(active, posts)
                if ready:
                    self._tick(ready, active, posts)
                elif active:
                    wake.wait(0.05)
        except KeyboardInterrupt:
            self.say("tsm-surgery stream: interrupted; summary follows")
        for stream in list(active):
            self._end(stream, active, posts)
        return self.stats

    def _collect(self, active: dict, posts: dict) -> dict[int, SourceFrame]:
        ready = {}
        for stream, source in list(active.items()):
            item = source.next_item()
            while isinstance(item, SourceMessage):
                if not self._message(stream, item, active, posts):
                    break
                item = source.next_item()
            if isinstance(item, SourceFrame):
                ready[stream] = item
        return ready

    def _message(self, stream: int, message: SourceMessage, active: dict, posts: dict) -> bool:
        """Handles a source message; returns whether the stream goes on."""
        source = active[stream]
        if message.kind == "note":
            self.say(f"tsm-surgery stream: {source.name}: {message.text}")
            return True
        if message.kind == "reset":
            self.say(f"tsm-surgery stream: {source.name}: {message.text}")
            self.on_end(source.name, posts[stream].finish())
            self.batch.reset(stream)
            return True
        stats = self.stats[source.name]
        if message.kind == "error":
            stats.failed = True
            text = message.text if source.name in message.text else f"{source.name}: {message.text}"
            self.say(f"tsm-surgery stream: {text}")
        elif stats.frames == 0 and not stats.failed:
            stats.failed = True
            self.say(f"tsm-surgery stream: no video frames decoded from {source.name!r}.")
        self._end(stream, active, posts)
        return False

    def _end(self, stream: int, active: dict, posts: dict) -> None:
        source = active.pop(stream)
        source.close()
        self.stats[source.name].dropped = source.dropped
        self.on_end(source.name, posts.pop(stream).finish())
        self.batch.remove(stream)

    def _tick(self, ready: dict[int, SourceFrame], active: dict, posts: dict) -> None:
        prep, inputs = {}, []
        for stream, frame in ready.items():
            began = time.perf_counter()
            inputs.append(self.preprocess(frame.image).to(self.dtype))
            self.batch.feed(stream, inputs[-1])
            prep[stream] = time.perf_counter() - began
        plain_first = self.plain is not None and self.ticks % 2 == 1  # alternate: neither gets the warmer cache
        if plain_first:
            plain_s = self._time_plain(inputs)
        began = time.perf_counter()
        logits = self.batch.step()
        step_s = time.perf_counter() - began
        if self.plain is not None and not plain_first:
            plain_s = self._time_plain(inputs)
        self.ticks += 1
        timed_tick = False
        for stream, frame in ready.items():
            source, post = active[stream], posts[stream]
            began = time.perf_counter()
            probs, events = post(logits[stream], frame.time_s)
            post_s = time.perf_counter() - began
            done = time.perf_counter()
            lag = None if frame.due is None else max(0.0, done - frame.due)
            stats = self.stats[source.name]
            stats.frames += 1
            times = {"decode": frame.decode_s, "preprocess": prep[stream], "step": step_s, "post": post_s}
            if stats.frames > self.warmup:
                timed_tick = True
                for part, value in times.items():
                    stats.timed[part].append(value)
                if lag is not None:
                    stats.lag.append(lag)
                stats.first = done if stats.first is None else stats.first
                stats.last = done
            self.on_result(FrameResult(source.name, frame, probs, post.announced, events, step_s, times, lag))
        if timed_tick:
            self.step_times.append(step_s)
            if self.plain is not None:
                self.plain_times.append(plain_s)
                self.ratios.append(step_s / plain_s)

    def _time_plain(self, inputs: list[torch.Tensor]) -> float:
        frames = torch.cat(inputs)
        began = time.perf_counter()
        self.plain(frames)
        return time.perf_counter() - began

    def summary(self) -> list[str]:
        """Lines: per stream frames, fps, latency p50/p95 per part, lag, drops; and the step's median."""
        lines = []
        for stats in self.stats.values():
            parts = "  ".join(f"{part} {1e3 * percentile(stats.timed[part], 50):.2f}/"
                              f"{1e3 * percentile(stats.timed[part], 95):.2f}" for part in PARTS)
            lag = (f"; lag p50/p95/max {percentile(stats.lag, 50):.3f}/{percentile(stats.lag, 95):.3f}/"
                   f"{max(stats.lag):.3f} s" if stats.lag else "")
            drops = f"; {stats.dropped} frames dropped" if stats.dropped else ""
            if not stats.timed["step"]:
                lines.append(f"{stats.name}: {stats.frames} frames; none after the {self.warmup} warm-up frames, "
                             "so no latency figures (use a longer video or --warmup 0)")
                continue
            fps = stats.fps()
            rate = f"{fps:.1f} frames/s" if fps == fps else "one timed frame, no rate"
            lines.append(f"{stats.name}: {stats.frames} frames, {rate}; latency p50/p95 ms: {parts}{lag}{drops}")
        return lines

"""What is done with each stream's scores: masking, smoothing, hysteresis, events.

Each step is a small object with per-stream state (make one per stream; ``reset()`` starts again):

* :class:`ClassMask`: classes that can never be reported (``ignore``, or all but ``keep``).
* :class:`LogitAverage` (mean of the last ``k`` logits) and :class:`ExponentialAverage`.
* :class:`Hysteresis`: a class is announced once it has led for ``frames`` consecutive frames
  (with a probability of at least ``threshold``), and stays until another has led as long; it
  yields an :class:`Event` for each announced class when it is replaced or the stream ends.

:class:`PostProcess` chains them: mask the logits, smooth, softmax, hysteresis. The paper's
online demo does the same by hand (a 12-frame logit average and a hysteresis over classes).

Example:
    >>> post = PostProcess("cam0", smoothing=LogitAverage(3), hysteresis=Hysteresis(2))
    >>> for t in range(4):
    ...     probs, events = post(torch.tensor([0.0, 5.0]), time_s=t / 10)
    >>> [e.to_dict()["class"] for e in post.finish(0.4)]
    [1]
"""

import collections
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ClassMask", "LogitAverage", "ExponentialAverage", "Hysteresis", "Event", "PostProcess",
           "parse_smoothing"]


class ClassMask:
    """Sets the logits of classes that must not be reported to ``-inf``.

    Args:
        num_classes: the network's number of classes.
        ignore: classes never reported (e.g. "no gesture").
        keep: if given, the only classes reported.
    """

    def __init__(self, num_classes: int, ignore=(), keep=None):
        chosen = list(ignore) + list(keep or ())
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"classes {bad} are out of range: the network has {num_classes} classes "
                             f"(0..{num_classes - 1}).")
        allowed = torch.full((num_classes,), keep is None, dtype=torch.bool)
        if keep is not None:
            allowed[list(keep)] = True
        allowed[list(ignore)] = False
        if not allowed.any():
            raise ValueError("the class mask leaves no class to report; keep at least one.")
        self.allowed = allowed

    def __call__(self, logits: Tensor) -> Tensor:
        return logits.masked_fill(~self.allowed.to(logits.device), float("-inf"))

    def reset(self) -> None:
        pass


class LogitAverage:
    """Mean of the last ``k`` logit vectors (fewer at the start of a stream)."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"the logit average needs k >= 1 frames, got {k}.")
        self.k = int(k)
        self._window: collections.deque = collections.deque(maxlen=self.k)

    def __call__(self, logits: Tensor) -> Tensor:
        self._window.append(logits.float())
        return torch.stack(list(self._window)).mean(0)

    def reset(self) -> None:
        self._window.clear()


class ExponentialAverage:
    """``avg = alpha * logits + (1 - alpha) * avg``, starting from the first frame's logits."""

    def __init__(self, alpha: float):
        if not 0 < alpha <= 1:
            raise ValueError(f"the exponential average needs 0 < alpha <= 1, got {alpha}.")
        self.alpha = float(alpha)
        self._avg: Tensor | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        self._avg = logits if self._avg is None else self.alpha * logits + (1 - self.alpha) * self._avg
        return self._avg

    def reset(self) -> None:
        self._avg = None


def parse_smoothing(text: str | None):
    """``"avg:K"``: :class:`LogitAverage`; ``"ema:ALPHA"``: :class:`ExponentialAverage`; ``None``/``"none"``: None."""
    if text is None or text == "none":
        return None
    kind, _, value = text.partition(":")
    try:
        if kind == "avg":
            return LogitAverage(int(value))
        if kind == "ema":
            return ExponentialAverage(float(value))
    except ValueError as err:
        raise ValueError(f"--smooth {text}: {err}") from None
    raise ValueError(f"--smooth {text!r}: use avg:K (mean of the last K frames' logits) or ema:ALPHA (0 < ALPHA <= 1).")


@dataclass
class Event:
    """An announced class over ``[start_s, end_s)`` of a stream; ``score`` is its mean probability there."""

    stream: str
    class_index: int
    start_s: float
    end_s: float
    score: float
    label: str | None = None

    def to_dict(self) -> dict:
        out = {"stream": self.stream, "class": self.class_index, "start_s": round(self.start_s, 4),
               "end_s": round(self.end_s, 4), "score": round(self.score, 4)}
        if self.label is not None:
            out["label"] = self.label
        return out


class Hysteresis:
    """Announces a class after it led ``frames`` frames in a row; another must lead as long to replace it.

    A frame whose top probability is below ``threshold`` is led by nobody; nobody leading for
    ``frames`` frames ends the announced class without announcing another.
    """

    def __init__(self, frames: int, threshold: float = 0.0):
        if frames < 1:
            raise ValueError(f"the hysteresis needs frames >= 1, got {frames}.")
        self.frames, self.threshold = int(frames), float(threshold)
        self.reset()

    def reset(self) -> None:
        self.announced: int | None = None
        self._start = 0.0
        self._scores: list[float] = []
        self._candidate: int | None = None
        self._run_start, self._run_scores = 0.0, []

    def __call__(self, probs: Tensor, time_s: float) -> list[tuple[int, float, float, float]]:
        """Feeds one frame's probabilities; returns the ended ``(class, start_s, end_s, score)``."""
        top, leader = probs.max(0)
        leader = int(leader) if float(top) >= self.threshold else None
        if self.announced is not None:
            self._scores.append(float(probs[self.announced]))
        if leader == self.announced:
            self._candidate, self._run_scores = None, []
            return []
        if leader != self._candidate:
            self._candidate, self._run_start, self._run_scores = leader, time_s, []
        self._run_scores.append(0.0 if leader is None else float(probs[leader]))
        if len(self._run_scores) < self.frames:
            return []
        ended = self._close(self._run_start, len(self._run_scores))
        self.announced, self._start, self._scores = leader, self._run_start, list(self._run_scores)
        self._candidate, self._run_scores = None, []
        return ended

    def finish(self, time_s: float) -> list[tuple[int, float, float, float]]:
        """Ends the stream: the announced class (if any) ends at ``time_s``."""
        ended = self._close(time_s, 0)
        self.reset()
        return ended

    def _close(self, end_s: float, overlap: int) -> list[tuple[int, float, float, float]]:
        if self.announced is None:
            return []
        scores = self._scores[:len(self._scores) - overlap] or self._scores
        return [(self.announced, self._start, end_s, sum(scores) / len(scores))]


class PostProcess:
    """One stream's chain: mask, smoothing, softmax, hysteresis; each part optional.

    Calling it with a frame's logits returns ``(probabilities, ended events)``; the
    probabilities are those of the smoothed, masked logits.
    """

    def __init__(self, stream: str, *, mask: ClassMask | None = None, smoothing=None,
                 hysteresis: Hysteresis | None = None, labels: list[str] | None = None):
        self.stream, self.mask, self.smoothing, self.hysteresis = stream, mask, smoothing, hysteresis
        self.labels = labels
        self.last_time = 0.0

    def __call__(self, logits: Tensor, time_s: float) -> tuple[Tensor, list[Event]]:
        logits = logits.float()
        if self.smoothing is not None:
            logits = self.smoothing(logits)
        if self.mask is not None:
            logits = self.mask(logits)
        probs = logits.softmax(-1)
        self.last_time = time_s
        ended = self.hysteresis(probs, time_s) if self.hysteresis is not None else []
        return probs, [self._event(*e) for e in ended]

    def finish(self, time_s: float | None = None) -> list[Event]:
        """The stream ended (or is reset): the announced class ends; the smoothing forgets."""
        ended = self.hysteresis.finish(self.last_time if time_s is None else time_s) if self.hysteresis else []
        if self.smoothing is not None:
            self.smoothing.reset()
        return [self._event(*e) for e in ended]

    @property
    def announced(self) -> int | None:
        return None if self.hysteresis is None else self.hysteresis.announced

    def _event(self, cls: int, start: float, end: float, score: float) -> Event:
        label = self.labels[cls] if self.labels and cls < len(self.labels) else None
        return Event(self.stream, cls, start, end, score, label)

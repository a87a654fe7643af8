"""Video sources: files, capture devices and network URLs, each read by its own thread.

A :class:`Source` decodes with PyAV (FFmpeg) in a background thread and hands frames to the
frame loop through a small buffer. What happens when the loop is slower than the source is the
drop policy:

* not real time (the default for files): the reader waits for the loop; no frame is lost.
* real time (the default for devices and URLs, ``realtime=True`` for a file paces it by its
  timestamps): the buffer keeps the newest ``buffer`` frames and drops the oldest
  (``drop="oldest"``), or first keeps only every ``every``-th decoded frame, which keeps a regular
  time step for the temporal model, and then drops the oldest beyond the buffer (``drop="every-k"``).

A network source that fails or ends reconnects with a doubling backoff (``reconnect`` attempts in
a row) and tells the loop to reset the stream's state; a URL whose container has a known duration
(a file served over HTTP) ends at its end instead. A read that waits longer than ``timeout_s``
counts as a failure (a stall). A frame of another size is said once and rescaled by the loop.
User names and passwords in URLs never appear in messages (:func:`redact`).

Example:
    >>> source = Source("clip.mp4")                 # doctest: +SKIP
    >>> source.start(); item = source.next_item()   # doctest: +SKIP
"""

import collections
import errno
import os
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

__all__ = ["Source", "SourceFrame", "SourceMessage", "redact", "source_kind", "NETWORK_SCHEMES"]

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "tcp", "udp", "http", "https", "srt", "rtp", "hls")
DROP_POLICIES = ("oldest", "every-k")
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.25, 8.0


@dataclass
class SourceFrame:
    """A decoded frame.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        index: frames decoded from the source before this one (dropped ones included).
        time_s: the stream's time: the frame's timestamp for a file, seconds since the stream
            connected for a live source.
        due: ``time.perf_counter()`` at which a real-time stream shows this frame (the lag is
            measured from it); ``None`` when the source is not read in real time.
        decode_s: seconds spent decoding it.
    """

    image: np.ndarray
    index: int
    time_s: float
    due: float | None
    decode_s: float


@dataclass
class SourceMessage:
    """Something the loop must know: ``kind`` is ``"note"`` (say it), ``"reset"`` (reconnected:
    reset the stream's state), ``"end"`` (no more frames) or ``"error"`` (the stream failed)."""

    kind: str
    text: str


def redact(text: str, url: str | None = None) -> str:
    """``text`` with every ``user:password@`` of a URL (and of ``url``'s, wherever it appears) replaced by ``***@``.

    Example:
        >>> redact("cannot open rtsp://admin:secret@10.0.0.2/live")
        'cannot open rtsp://***@10.0.0.2/live'
    """
    if url:
        userinfo = urlsplit(url).netloc.rpartition("@")[0] if "://" in url else ""
        if userinfo:
            text = text.replace(userinfo + "@", "***@").replace(userinfo, "***")
    return re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]*@", r"\1***@", text)


def source_kind(spec: str) -> str:
    """``"network"`` for a URL FFmpeg reads, ``"device"`` for ``/dev/video*``, else ``"file"``."""
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme in NETWORK_SCHEMES:
        return "network"
    if scheme:
        raise ValueError(f"{redact(spec)}: unknown scheme {scheme!r}; streams read files, /dev/videoN devices and "
                         f"{', '.join(s + '://' for s in NETWORK_SCHEMES)} URLs.")
    if re.fullmatch(r"/dev/video\d+", spec):
        return "device"
    return "file"


class Source:
    """One video source read by a background thread (see the module docstring for the policies).

    Args:
        spec: a file path, ``/dev/videoN`` or a URL.
        realtime: drop frames when the loop falls behind; default: true for devices and URLs.
        drop: ``"oldest"`` or ``"every-k"``.
        every: with ``drop="every-k"``, keep one decoded frame in ``every``.
        buffer: frames held for the loop (real time: the newest ones).
        timeout_s: longest wait to connect or for the next packet of a device or URL.
        reconnect: attempts in a row to reconnect a network source (0: end it at the first failure).
        max_frames: stop after this many decoded frames.
        wake: an event set whenever an item is ready (one event shared by all sources).

    Attributes:
        name: ``spec`` without credentials, for messages.
        dropped: frames dropped so far by the real-time policy.
        fps: the frames' rate the loop gets without drops (``None`` until the source is open).
    """

    def __init__(self, spec: str, *, realtime: bool | None = None, drop: str = "oldest", every: int = 2,
                 buffer: int = 1, timeout_s: float = 5.0, reconnect: int = 5, max_frames: int | None = None,
                 wake: threading.Event | None = None):
        if drop not in DROP_POLICIES:
            raise ValueError(f"drop policy {drop!r} is not one of {DROP_POLICIES}.")
        self.spec, self.kind, self.name = spec, source_kind(spec), redact(spec)
        self.realtime = self.kind != "file" if realtime is None else bool(realtime)
        self.drop, self.every, self.buffer = drop, max(1, int(every)), max(1, int(buffer))
        self.timeout_s, self.reconnect, self.max_frames = float(timeout_s), int(reconnect), max_frames
        self.wake = wake or threading.Event()
        self.dropped = 0
        self.fps: float | None = None  # the stream's frame rate, once it is open
        self._items: collections.deque = collections.deque()
        self._frames_held = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._epoch: float | None = None  # the first frame's arrival: a live stream's time 0

    # ------------------------------------------------------------------ loop side
    def check(self) -> None:
        """Fails early, before any thread starts, for a missing file or device."""
        if self.kind == "file" and not os.path.isfile(self.spec):
            raise FileNotFoundError(f"video {self.spec!r} does not exist or is not a file.")
        if self.kind == "device" and not os.path.exists(self.spec):
            raise FileNotFoundError(f"capture device {self.spec} does not exist; hint: ls /dev/video* "
                                    "(or v4l2-ctl --list-devices) shows the cameras this machine has.")

    def start(self) -> "Source":
        self._thread = threading.Thread(target=self._read_or_fail, name=f"source {self.name}", daemon=True)
        self._thread.start()
        return self

    def next_item(self) -> "SourceFrame | SourceMessage | None":
        """The next frame or message, or ``None`` when none is ready; never blocks."""
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, SourceFrame):
                self._frames_held -= 1
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Stops the reader (it ends at its next frame or timeout)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ reader side
    def _put(self, item) -> None:
        with self._cond:
            if isinstance(item, SourceFrame):
                if self.realtime:
                    while self._frames_held >= self.buffer:
                        self._drop_oldest()
                else:
                    while self._frames_held >= self.buffer and not self._stop.is_set():
                        self._cond.wait(0.1)
                self._frames_held += 1
            self._items.append(item)
        self.wake.set()

    def _drop_oldest(self) -> None:
        for i, old in enumerate(self._items):
            if isinstance(old, SourceFrame):
                del self._items[i]
                self._frames_held -= 1
                self.dropped += 1
                return

    def _say(self, kind: str, text: str) -> None:
        self._put(SourceMessage(kind, redact(text, self.spec)))

    def _open(self):
        import av

        if self.kind == "file":
            return av.open(self.spec)
        options = {"rtsp_transport": "tcp"} if self.spec.lower().startswith("rtsp") else {}
        fmt = "v4l2" if self.kind == "device" else None
        return av.open(self.spec, format=fmt, options=options, timeout=(self.timeout_s, self.timeout_s))

    def _read_or_fail(self) -> None:
        try:
            self._read()
        except Exception as err:  # never leave the loop waiting for a reader that died
            self._say("error", f"the reader failed ({_reason(err)})")

    def _read(self) -> None:
        attempts, connections, decoded = 0, 0, 0
        while not self._stop.is_set():
            try:
                container = self._open()
            except Exception as err:  # FFmpeg raises many types for a source it cannot open
                if self.kind == "network" and attempts < self.reconnect:
                    attempts += 1
                    self._backoff(attempts, f"cannot connect ({_reason(err)})")
                    continue
                self._say("error", self._open_error(err))
                return
            connections += 1
            if connections > 1:
                self._say("reset", "reconnected; the stream's state is reset")
            try:
                has_end = container.duration is not None  # a file served over a URL ends; a live stream does not
                decoded, error, finished = self._decode(container, decoded)
            finally:
                container.close()
            if finished or self._stop.is_set():
                break
            if self.kind == "network" and (error is not None or not has_end):
                attempts = 0 if error is None else attempts
                if attempts < self.reconnect:
                    attempts += 1
                    cause = "stalled or failed: " + _reason(error) if error is not None else "disconnected"
                    self._backoff(attempts, cause)
                    continue
                self._say("error", f"gave up after {self.reconnect} reconnection attempts")
                return
            if error is not None and self.kind == "device":
                self._say("error", f"capture device {self.spec} failed after {decoded} frames ({_reason(error)}); "
                                   "it may have been unplugged, or stalled longer than --timeout.")
                return
            if error is not None:
                self._say("error", f"cannot decode video {self.name!r} after {decoded} frames "
                                   f"({_reason(error)}); the file may be truncated or corrupt, or not a video.")
                return
            break
        self._say("end", f"ended after {decoded} frames")

    def _backoff(self, attempt: int, cause: str) -> None:
        delay = min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (attempt - 1))
        self._say("note", f"{cause}; reconnecting in {delay:.2g} s (attempt {attempt} of {self.reconnect})")
        self._stop.wait(delay)

    def _open_error(self, err: Exception) -> str:
        code = getattr(err, "errno", None)
        if self.kind == "device" and code == errno.EBUSY:
            return f"capture device {self.spec} is busy: another program is using it; close it and try again."
        if self.kind == "device":
            return (f"cannot open capture device {self.spec} ({_reason(err)}); "
                    "hint: check its permissions (the video group).")
        if self.kind == "network":
            return (f"cannot open {self.name} ({_reason(err)}); hint: check that the server runs and the URL, "
                    f"or raise --timeout (now {self.timeout_s:g} s).")
        return f"cannot open video {self.name!r} ({_reason(err)}); the file may be corrupt, or not a video."

    def _decode(self, container, decoded: int) -> tuple[int, Exception | None, bool]:
        """Decodes until the container ends or fails; returns (frames decoded, error, max_frames reached)."""
        first_shape, said_size, start_wall, start_pts = None, False, None, None
        videos = container.streams.video
        rate = videos[0].average_rate if videos else None  # no video stream: decoding below says so
        self.fps = float(rate) / (self.every if self.drop == "every-k" else 1) if rate else None
        frames = container.decode(video=0)
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                frame = next(frames)
                image = frame.to_ndarray(format="rgb24")
            except StopIteration:
                return decoded, None, False
            except Exception as err:  # a decoding or network failure
                return decoded, err, False
            now = time.perf_counter()
            pts = frame.time
            if start_wall is None:
                start_wall, start_pts, first_shape = now, pts, image.shape
            elif image.shape != first_shape and not said_size:
                said_size = True
                self._say("note", f"frame size changed from {first_shape[1]}x{first_shape[0]} to {image.shape[1]}x"
                                  f"{image.shape[0]} at frame {decoded}; frames are rescaled to the model's input "
                                  "(said once)")
            clock = pts - start_pts if pts is not None and start_pts is not None else now - start_wall
            if self._epoch is None:
                self._epoch = now
            time_s = clock if self.kind == "file" else now - self._epoch
            due = None
            if self.realtime:
                due = start_wall + clock
                if self.kind == "file" and due > now:  # a file read in real time is paced by its timestamps
                    self._stop.wait(due - now)
            keep = self.drop != "every-k" or decoded % self.every == 0
            if keep:
                self._put(SourceFrame(image, decoded, float(time_s), due, now - began))
            elif self.realtime:
                self.dropped += 1
            decoded += 1
            if self.max_frames is not None and decoded >= self.max_frames:
                return decoded, None, True
        return decoded, None, True


def _reason(err: BaseException | None) -> str:
    if err is None:
        return ""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__

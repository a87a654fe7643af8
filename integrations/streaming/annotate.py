"""``--annotate``: a stream's video with its current top-k labels and score bars, drawn with Pillow.

Each frame is scaled to ``width`` pixels (height by the first frame's aspect ratio; a later
frame of another size is scaled to the same box) and a panel is added below it: one row per
class of the top-k, the class name and probability as text beside a bar whose length is the
smoothed probability (full length = 1.0). The announced class (hysteresis), if any, is named in
the panel's first line. Written with PyAV (H.264 when available, else MPEG-4 Part 2).

Example:
    >>> with Annotator("out.mp4", fps=25, topk=3) as video:    # doctest: +SKIP
    ...     video.write(frame, probs, labels=None, announced=None)
"""

import numpy as np
import torch

__all__ = ["Annotator", "panel_geometry", "BAR_COLOUR"]

BAR_COLOUR = (40, 200, 90)
_BACKGROUND, _TEXT, _TRACK = (16, 16, 16), (240, 240, 240), (70, 70, 70)
ROW, MARGIN = 20, 6


def panel_geometry(width: int, topk: int) -> dict:
    """Where the panel below the frame draws: its ``height``,
    the text's ``x_text``, and per row ``i`` the bar's ``x0``, ``x1`` (full scale) and top ``y_bar(i)``,
    relative to the panel, whose top is the frame's height."""
    return {"height": ROW * (topk + 1) + MARGIN, "x_text": MARGIN, "x0": width * 11 // 20, "x1": width - MARGIN,
            "y_bar": lambda i: ROW * (i + 1) + MARGIN // 2 + 3, "bar_height": ROW - 8}


class Annotator:
    """Writes one stream's annotated video (see the module docstring).

    Args:
        path: the output video (``.mp4``).
        fps: frame rate written in the container.
        topk: classes shown per frame.
        width: output width in pixels (even).
    """

    def __init__(self, path: str, fps: float = 25.0, topk: int = 3, width: int = 320):
        import av

        self.path, self.topk, self.width = path, int(topk), int(width) // 2 * 2
        self._container = av.open(path, "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=max(1, round(fps)))
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self._stream.options = {"crf": "18", "preset": "veryfast"}
        self._frame_height: int | None = None
        self._font = _font()

    def write(self, frame: np.ndarray, probs: torch.Tensor, labels: list[str] | None = None,
              announced: int | None = None) -> None:
        """Draws and encodes one frame: ``frame`` ``(H, W, 3)`` uint8 RGB, ``probs`` ``(num_classes,)``."""
        import av
        from PIL import Image, ImageDraw

        if self._frame_height is None:
            self._frame_height = max(2, round(self.width * frame.shape[0] / frame.shape[1] / 2) * 2)
            geometry = panel_geometry(self.width, self.topk)
            self._stream.width, self._stream.height = self.width, self._frame_height + geometry["height"]
        geometry = panel_geometry(self.width, self.topk)
        canvas = Image.new("RGB", (self.width, self._frame_height + geometry["height"]), _BACKGROUND)
        canvas.paste(Image.fromarray(frame).resize((self.width, self._frame_height), Image.BILINEAR), (0, 0))
        draw = ImageDraw.Draw(canvas)
        top = self._frame_height
        heading = "" if announced is None else f"now: {_name(announced, labels)}"
        draw.text((geometry["x_text"], top + 3), heading, fill=_TEXT, font=self._font)
        values, classes = probs.float().topk(min(self.topk, probs.numel()))
        for i, (value, cls) in enumerate(zip(values.tolist(), classes.tolist())):
            y = top + geometry["y_bar"](i)
            x0, x1 = geometry["x0"], geometry["x1"]
            draw.rectangle((x0, y, x1 - 1, y + geometry["bar_height"] - 1), fill=_TRACK)
            length = round((x1 - x0) * max(0.0, min(1.0, value)))
            if length > 0:
                draw.rectangle((x0, y, x0 + length - 1, y + geometry["bar_height"] - 1), fill=BAR_COLOUR)
            text = f"{_name(cls, labels)[:24]}  {value:.2f}"
            draw.text((geometry["x_text"], y - 1), text, fill=_TEXT, font=self._font)
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is None:
            return
        if self._frame_height is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> "Annotator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _name(cls: int, labels: list[str] | None) -> str:
    return labels[cls] if labels and cls < len(labels) else str(cls)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()

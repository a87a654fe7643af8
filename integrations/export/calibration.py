"""Checks and feeds for int8 calibration: clips of normalised frames, and the inputs a stream sees.

The clips themselves come from decoded videos
(:func:`tsm_surgery.integrations.streaming.calibration.load_calibration`).
"""

from collections.abc import Iterator, Sequence

import torch

__all__ = ["check_calibration", "online_feeds"]


def check_calibration(clips: Sequence[torch.Tensor], frame_shape: Sequence[int]) -> list[torch.Tensor]:
    """Checks every clip is ``(T, *frame_shape)`` float; returns them as a list, or raises ValueError."""
    clips = list(clips)
    if not clips:
        raise ValueError("the calibration set is empty. Hint: pass decoded clips (load_calibration) or a video "
                         "directory with --calibration.")
    want = tuple(frame_shape)
    for i, clip in enumerate(clips):
        if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or tuple(clip.shape[1:]) != want:
            shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
            what = "channel count" if isinstance(clip, torch.Tensor) and clip.dim() == 4 and clip.shape[1] != want[0] \
                else "frame size"
            raise ValueError(f"calibration clip {i} has shape {shape}: wrong {what}, the network takes "
                             f"(T, {', '.join(map(str, want))}) clips. Hint: decode with "
                             f"load_calibration(..., size={want[-1]}) or resize the frames.")
        if not clip.is_floating_point():
            raise ValueError(f"calibration clip {i} is {clip.dtype}; it must be the normalised float frames the "
                             "float network takes (see Preprocess).")
    return clips


def online_feeds(step, init_state: Sequence[torch.Tensor], clips: Sequence[torch.Tensor]
                 ) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(frame, *caches)`` for every frame of every clip, the caches those ``step`` produced for the
    previous frame of the same clip (zeros at each clip's first frame): the inputs a stream really sees."""
    with torch.no_grad():
        for clip in clips:
            caches = tuple(torch.zeros_like(c) for c in init_state)
            for frame in clip:
                feed = (frame[None], *caches)
                yield feed
                caches = tuple(step(*feed)[1:])

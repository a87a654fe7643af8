"""Calibration clips for int8 export: decoded real videos, preprocessed as :class:`.stream.Preprocess` does.

A calibration set is a list of clips, each a float tensor ``(T, 3, H, W)`` already normalised.
It comes from a directory of videos, an MMAction2 data config (its test, else val, annotation
list) or, by default, a small set of the demo's synthetic videos generated on the fly.

Example:
    >>> clips = load_calibration(None, size=32, n_frames=4, max_clips=2)   # the demo data
    >>> len(clips), tuple(clips[0].shape)
    (2, (4, 3, 32, 32))
"""

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .stream import Preprocess, decode

__all__ = ["load_calibration", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def _videos_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def _videos_of_config(config: Path) -> list[Path]:
    """The videos an MMAction2 config's test (else val) dataloader reads."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    for key in ("test_dataloader", "val_dataloader", "train_dataloader"):
        dataset = cfg.get(key, {}).get("dataset") if cfg.get(key) else None
        if dataset and dataset.get("ann_file"):
            root = Path(dataset.get("data_prefix", {}).get("video", ""))
            lines = Path(dataset["ann_file"]).read_text().splitlines()
            return [root / line.rsplit(" ", 1)[0] for line in lines if line.strip()]
    raise ValueError(f"--calibration {config}: the config has no test/val/train dataloader with an ann_file. "
                     "Hint: pass a directory of videos instead.")


def _demo_videos(count: int, frames: int) -> tuple[list[Path], tempfile.TemporaryDirectory]:
    from tsm_surgery.integrations.demo.synth_data import generate

    tmp = tempfile.TemporaryDirectory(prefix="tsm_calibration_")
    per_class = max(3, -(-count // 6))  # synth-data needs one video per split
    out = Path(tmp.name) / "data"
    generate(out, videos_per_class=per_class, size=64, frames=max(frames, 8), seed=0)
    return _videos_in(out / "videos"), tmp


def _spread(videos: list[Path], count: int) -> list[Path]:
    """``count`` videos spread over the sorted list, so every class of a class-sorted tree is seen."""
    if len(videos) <= count:
        return videos
    return [videos[i * len(videos) // count] for i in range(count)]


def _clip_of(path: Path, preprocess, n_frames: int) -> torch.Tensor | None:
    frames = [preprocess(f) for f in decode(str(path))]
    if not frames:
        return None
    picks = [min(len(frames) - 1, i * len(frames) // n_frames) for i in range(n_frames)]  # TSN-style uniform sampling
    return torch.cat([frames[i] for i in picks])


def load_calibration(source: str | os.PathLike | None, size: int, n_frames: int = 8, max_clips: int = 16,
                     mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                     scale: float = 255.0, flip_channels: bool = False) -> list[torch.Tensor]:
    """Decodes up to ``max_clips`` clips of ``n_frames`` frames, each ``(n_frames, 3, size, size)``.

    Args:
        source: a directory of videos, an MMAction2 data config (``.py``), or None for a small set
            of the demo's synthetic videos (``tsm-surgery synth-data``), generated in a temporary
            directory and removed afterwards.
        size: frame height and width after resize (short side) and centre crop.
        n_frames: frames per clip, sampled uniformly over each video.
        max_clips: at most this many videos, spread over the sorted list.
        mean, std, scale, flip_channels: normalisation, as :class:`.stream.Preprocess`.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` holds no decodable video.
    """
    tmp = None
    if source is None:
        videos, tmp = _demo_videos(max_clips, n_frames)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"--calibration {source}: no such directory or config. Hint: pass a directory "
                                    "of videos, an MMAction2 data config, or generate the demo data with "
                                    "`tsm-surgery synth-data OUT_DIR`.")
        videos = _videos_of_config(path) if path.is_file() else _videos_in(path)
    try:
        preprocess = Preprocess(size, mean, std, scale, flip_channels)
        clips = [c for c in (_clip_of(v, preprocess, n_frames) for v in _spread(videos, max_clips)) if c is not None]
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not clips:
        raise ValueError(f"--calibration {source}: found no decodable video ({', '.join(VIDEO_SUFFIXES)}). "
                         "Hint: point it at the videos/ directory of a dataset.")
    return clips

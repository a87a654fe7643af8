"""Decoding, preprocessing and the models of ``tsm-surgery stream`` (the verb is in ``integrations/cli/stream.py``).

:func:`decode` reads a video file's frames with PyAV (or decord when PyAV is missing);
:class:`Preprocess` centre-crops and resizes a frame to the network's input and normalises it;
:func:`build_models` makes the online network (``--model`` or an MMAction2 ``--config``), the
plain 2D model for ``--benchmark``, and the preprocessing, from the verb's arguments.
"""

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tsm_surgery
from tsm_surgery.integrations.checkpoints import check_checkpoint_layout, read_state_dict, shift_for_checkpoint
from tsm_surgery.integrations.checkpoints.loading import cli_log
from tsm_surgery.integrations.models import build_model, default_frame_size

from .engine import TorchEngine

__all__ = ["decode", "Preprocess", "Models", "build_models", "MAX_FRAME_SIZE"]

MAX_FRAME_SIZE = 2048  # a 2048 px float frame is 50 MB; video networks run at 112-448 px

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(path: str, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yields the video's frames as ``(H, W, 3)`` uint8 RGB arrays (PyAV, else decord).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded (truncated, corrupt, not a video); the message
            names the file and how many frames were decoded before the error.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist or is not a file.")
    count = 0
    try:
        for frame in _frames(path):
            if max_frames is not None and count >= max_frames:
                return
            yield frame
            count += 1
    except ImportError:
        raise
    except Exception as err:  # PyAV/decord raise many types (InvalidDataError, IndexError...) for bad files
        raise ValueError(f"cannot decode video {path!r} after {count} frames ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the file may be truncated or corrupt, "
                         "or not a video.") from err


def _frames(path: str) -> Iterator[np.ndarray]:
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        return
    try:
        import decord
    except ImportError:
        raise ImportError("decoding needs PyAV or decord: pip install av") from None
    reader = decord.VideoReader(path)
    for i in range(len(reader)):
        yield reader[i].asnumpy()


class Preprocess:
    """RGB uint8 ``(H, W, 3)`` -> normalised ``(1, 3, size, size)`` float tensor.

    Centre-crops the largest square, resizes it to ``size x size`` (bilinear, antialiased):
    the same as resizing the short side to ``size`` and centre-cropping, but it only converts
    and resizes the crop, so a very wide or tall frame never grows in memory. Then normalises
    with ``mean``/``std`` given on the scale after dividing by ``scale`` (ImageNet's [0, 1] for
    timm; ``scale=1`` and 0-255 statistics for MMAction2).

    Example:
        >>> Preprocess(32)(np.zeros((48, 64, 3), np.uint8)).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 scale: float = 255.0, flip_channels: bool = False):
        if not 1 <= int(size) <= MAX_FRAME_SIZE:
            raise ValueError(f"frame size {size} is out of range 1..{MAX_FRAME_SIZE} px; video networks run at "
                             "112-448 px (--size).")
        self.size = int(size)
        self.flip_channels = flip_channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = float(scale)

    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        h, w = frame.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = np.ascontiguousarray(frame[top:top + side, left:left + side])
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / self.scale
        if self.flip_channels:
            x = x.flip(1)
        if side != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std


@dataclass
class Models:
    """What the verb streams with: the 2D model (``--benchmark``), the online network, an optional
    head applied to its output, and the preprocessing."""

    plain: Callable[[torch.Tensor], torch.Tensor]
    online: tsm_surgery.OnlineTSM
    head: Callable[[torch.Tensor], torch.Tensor] | None
    preprocess: Preprocess

    def cast(self, dtype: torch.dtype) -> None:
        """Weights in ``dtype`` (the 2D model shares them with the online network, the head is cast too)."""
        for part in (self.online, self.plain, getattr(self.head, "head", None)):
            if isinstance(part, nn.Module):
                part.to(dtype)

    def engine(self, dtype: torch.dtype | None = None) -> TorchEngine:
        size = self.preprocess.size
        return TorchEngine(self.online, (3, size, size), dtype=dtype, head=self.head)


def build_models(args: argparse.Namespace) -> Models:
    """The :class:`Models` for ``--model`` (timm/torchvision) or ``--config`` (MMAction2)."""
    return _from_mmaction(args) if getattr(args, "config", None) else _from_timm(args)


def _from_timm(args: argparse.Namespace) -> Models:
    """``--model``: the 2D model and the online network share weights."""
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = build_model(args.model, checkpoint=args.checkpoint, **kwargs).eval()
    size = args.size or default_frame_size(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pre = Preprocess(size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    # inplace: the converted and online networks reuse the 2D model's modules, so the
    # benchmark compares the same weights in the same memory.
    weights = read_state_dict(args.checkpoint)[0] if args.checkpoint else None  # read once for both checks
    _, slot = shift_for_checkpoint(weights, "uni", args.uni_slot, "--checkpoint", log=cli_log)
    net = tsm_surgery.convert(model, n_segments=8, shift_div=args.shift_div, direction="uni",
                              uni_slot=slot, example_input=torch.zeros(1, 3, size, size), inplace=True)
    check_checkpoint_layout(weights, net, "--checkpoint", log=cli_log)
    online = tsm_surgery.to_online(net, frame_shape=(3, size, size), inplace=True)
    return Models(model, online, None, pre)


def _from_mmaction(args: argparse.Namespace) -> Models:
    """``--config`` with ``--checkpoint``: the online backbone followed by the config's head.

    The backbone must be a ``TSMSurgeryBackbone`` with ``direction='uni'``; at each frame the
    online backbone's features go through the config's head with ``num_segs=1``.
    """
    try:
        from tsm_surgery.integrations.mmaction.recognizer import load_recognizer, normalization, tsm_backbone_net
    except ImportError as err:
        raise ImportError(f"--config needs MMAction2 ({err}). "
                          "Install the extras: pip install 'tsm_surgery[mmaction]'.") from None
    recognizer = load_recognizer(args.config, args.checkpoint)
    net = tsm_backbone_net(recognizer, f"--config {args.config}")
    if net.direction != "uni":
        raise ValueError(f"--config {args.config}: the backbone shifts direction='bi' (it reads future "
                         "frames); train a config with direction='uni' to stream it.")
    online = tsm_surgery.to_online(net, inplace=True)
    mean, std, to_rgb = normalization(recognizer)
    # MMAction2 normalises on the 0-255 scale; its decoders give RGB, which to_rgb would flip.
    pre = Preprocess(args.size or 224, mean, std, scale=1.0, flip_channels=to_rgb)
    backbone, head = recognizer.backbone, recognizer.cls_head
    two_d = getattr(backbone, "model2d", backbone)
    one_frame_head = _OneFrameHead(head)
    return Models(lambda frames: one_frame_head(two_d(frames)), online, one_frame_head, pre)


class _OneFrameHead:
    """An MMAction2 head on one-frame clips: ``(N, C, h, w)`` features of N streams -> ``(N, classes)``."""

    def __init__(self, head: nn.Module):
        self.head = head

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        # TSMHead reshapes by its own num_segments, not by the num_segs argument: one frame here.
        segments = getattr(self.head, "num_segments", None)
        if segments is not None:
            self.head.num_segments = 1
        try:
            return self.head(features, num_segs=1)
        finally:
            if segments is not None:
                self.head.num_segments = segments



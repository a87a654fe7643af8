"""``tsm-surgery stream``: run a video frame by frame through an online (uni) TSM network.

The video is decoded with PyAV (or decord when PyAV is missing); every frame is resized
(short side), centre-cropped, normalised and fed alone to :func:`tsm_surgery.to_online`'s
module, which keeps the shifted channels of the previous frame as its state. For each frame
the top-k classes are printed, then the throughput.

``--benchmark`` also times the plain 2D model on the same frame, side by side in one run (the
order alternates frame by frame so neither side gets the warmer cache), and reports the
median of the per-frame ratios online / 2D.

Example::

    tsm-surgery stream video.mp4 --model timm:mobilenetv2_100 --topk 3 --benchmark
    tsm-surgery stream video.mp4 --config my_tsm_uni_config.py --checkpoint epoch_50.pth
"""

import argparse
import os
import statistics
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tsm_surgery
from tsm_surgery.cli import non_negative_int, positive_int
from tsm_surgery.integrations.checkpoints import check_checkpoint_layout, layout_adapter, shift_for_checkpoint
from tsm_surgery.integrations.checkpoints.loading import cli_log, load_state_dict_file
from tsm_surgery.integrations.models import build_model, default_frame_size

__all__ = ["decode", "Preprocess", "add_arguments", "run"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(path: str, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
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

    Resizes the short side to ``size`` (bilinear, antialiased), centre-crops ``size x size``
    and normalises with ``mean``/``std`` given on the scale after dividing by ``scale``
    (ImageNet's [0, 1] for timm; ``scale=1`` and 0-255 statistics for MMAction2).

    Example:
        >>> Preprocess(32)(np.zeros((48, 64, 3), np.uint8)).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 scale: float = 255.0, flip_channels: bool = False):
        self.size = int(size)
        self.flip_channels = flip_channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = float(scale)

    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / self.scale
        if self.flip_channels:
            x = x.flip(1)
        h, w = x.shape[-2:]
        ratio = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * ratio)), max(self.size, round(w * ratio))),
                          mode="bilinear", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std


def _from_timm(args: argparse.Namespace) -> Tuple[nn.Module, Callable, Preprocess]:
    """(2D model, online module, preprocessing) for ``--model``; both models share weights."""
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = build_model(args.model, checkpoint=args.checkpoint, **kwargs).eval()
    size = args.size or default_frame_size(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pre = Preprocess(size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    # inplace: the converted and online networks reuse the 2D model's modules, so the
    # benchmark compares the same weights in the same memory.
    _, slot = shift_for_checkpoint(args.checkpoint, "uni", args.uni_slot, "--checkpoint", log=cli_log)
    net = tsm_surgery.convert(model, n_segments=8, shift_div=args.shift_div, direction="uni",
                              uni_slot=slot, example_input=torch.zeros(1, 3, size, size), inplace=True)
    check_checkpoint_layout(args.checkpoint, net, "--checkpoint", log=cli_log)
    online = tsm_surgery.to_online(net, frame_shape=(3, size, size), inplace=True)
    return model, online, pre


def _from_mmaction(args: argparse.Namespace) -> Tuple[nn.Module, Callable, Preprocess]:
    """(2D recognizer step, online step, preprocessing) for an MMAction2 config + checkpoint.

    The backbone must be a ``TSMSurgeryBackbone`` with ``direction='uni'``; at each frame the
    online backbone's features go through the config's head with ``num_segs=1``.
    """
    try:
        from mmaction.apis import init_recognizer

        import tsm_surgery.integrations.mmaction  # noqa: F401  registers the plugin, applies compat patches
    except ImportError as err:
        raise ImportError(f"--config needs MMAction2 ({err}). "
                          "Install the extras: pip install 'tsm_surgery[mmaction]'.") from None
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config {args.config!r} does not exist.")
    recognizer = init_recognizer(args.config, None, device="cpu")
    if args.checkpoint:  # mmengine's load_checkpoint is not strict: it would stream random weights
        load_state_dict_file(args.checkpoint, recognizer, source="--checkpoint",
                             adapt=layout_adapter(recognizer, "--checkpoint"))
    recognizer.eval()
    backbone, head = recognizer.backbone, recognizer.cls_head
    net = getattr(backbone, "net", None)
    if not isinstance(net, tsm_surgery.TSMNet):
        raise ValueError(f"--config {args.config}: the backbone is {type(backbone).__name__}; "
                         "streaming needs TSMSurgeryBackbone(direction='uni').")
    if net.direction != "uni":
        raise ValueError(f"--config {args.config}: the backbone shifts direction='bi' (it reads future "
                         "frames); train a config with direction='uni' to stream it.")
    online = tsm_surgery.to_online(net, inplace=True)
    preprocessor = recognizer.data_preprocessor
    mean = getattr(preprocessor, "mean", None)
    std = getattr(preprocessor, "std", None)
    mean = (0.0, 0.0, 0.0) if mean is None else [float(v) for v in mean.flatten()]
    std = (1.0, 1.0, 1.0) if std is None else [float(v) for v in std.flatten()]
    # MMAction2 normalises on the 0-255 scale; its decoders give RGB, which to_rgb would flip.
    pre = Preprocess(args.size or 224, mean, std, scale=1.0, flip_channels=bool(getattr(preprocessor, "to_rgb", False)))
    two_d = getattr(backbone, "model2d", backbone)
    return _WithHead(two_d, head), _WithHead(online, head), pre


class _WithHead(nn.Module):
    """A per-frame backbone followed by an MMAction2 head on a one-frame clip."""

    def __init__(self, backbone: Callable, head: nn.Module):
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)
        object.__setattr__(self, "_head", head)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        features = self._backbone(frames)
        # TSMHead reshapes by its own num_segments, not by the num_segs argument: one frame here.
        segments = getattr(self._head, "num_segments", None)
        if segments is not None:
            self._head.num_segments = 1
        try:
            return self._head(features, num_segs=1)
        finally:
            if segments is not None:
                self._head.num_segments = segments

    def reset(self) -> None:
        self._backbone.reset()


def _topk_line(index: int, scores: torch.Tensor, k: int, labels: Optional[List[str]], fps: float) -> str:
    probs = scores.float().softmax(-1)[0]
    values, classes = probs.topk(min(k, probs.numel()))
    names = [labels[c] if labels and c < len(labels) else str(int(c)) for c in classes.tolist()]
    tops = "  ".join(f"{n}:{v:.3f}" for n, v in zip(names, values.tolist()))
    return f"frame {index:5d}  {fps:7.1f} fps  top-{len(names)}: {tops}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="a video file (decoded with PyAV, or decord)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="timm:NAME or torchvision:NAME (random weights unless --checkpoint)")
    source.add_argument("--config", help="an MMAction2 config whose backbone is TSMSurgeryBackbone(direction='uni')")
    parser.add_argument("--checkpoint", help="weights (state_dict for --model, MMAction2 checkpoint for --config)")
    parser.add_argument("--num-classes", type=positive_int,
                        help="classifier size for --model (default: the model's own)")
    parser.add_argument("--shift-div", type=positive_int, default=8,
                        help="1/shift_div of the channels move (default 8)")
    parser.add_argument("--uni-slot", choices=("past", "first"),
                        help="for --model: channels read from the previous frame: 'past' = [fold, 2*fold) "
                             "(default), 'first' = [0, fold) as the paper's online demo (default for its checkpoint)")
    parser.add_argument("--size", type=positive_int,
                        help="frame side after resize and centre crop (default: model's input size)")
    parser.add_argument("--topk", type=positive_int, default=5, help="classes printed per frame (default 5)")
    parser.add_argument("--labels", help="text file with one class name per line")
    parser.add_argument("--max-frames", type=positive_int, help="stop after this many frames")
    parser.add_argument("--benchmark", action="store_true",
                        help="also time the plain 2D model on each frame; report the median online/2D ratio")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="frames left out of the timing statistics (default 2)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="weights and frames in this dtype, the caches follow (default float32)")


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts a model, or both halves of a :class:`_WithHead`, to ``dtype`` in place."""
    for part in (getattr(model, "_backbone", model), getattr(model, "_head", None)):
        if isinstance(part, nn.Module):
            part.to(dtype)


def _timed(fn: Callable, frames: torch.Tensor) -> Tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn(frames)
    return out, time.perf_counter() - start


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        plain, online, pre = _from_mmaction(args)
    else:
        plain, online, pre = _from_timm(args)
    dtype = getattr(torch, args.dtype)
    _cast(plain, dtype)
    _cast(online, dtype)
    labels = None
    if args.labels:
        with open(args.labels) as f:
            labels = [line.strip() for line in f]
    online.reset()
    online_times: List[float] = []
    ratios: List[float] = []
    plain_times: List[float] = []
    start = time.perf_counter()
    count = 0
    for index, frame in enumerate(decode(args.video, args.max_frames)):
        x = pre(frame).to(dtype)
        if args.benchmark and index % 2:  # alternate which model runs first
            _, t_plain = _timed(plain, x)
            scores, t_online = _timed(online, x)
        else:
            scores, t_online = _timed(online, x)
            if args.benchmark:
                _, t_plain = _timed(plain, x)
        if index >= args.warmup:
            online_times.append(t_online)
            if args.benchmark:
                plain_times.append(t_plain)
                ratios.append(t_online / t_plain)
        if not args.quiet:
            print(_topk_line(index, scores, args.topk, labels, 1.0 / t_online))
        count += 1
    wall = time.perf_counter() - start
    if count == 0:
        raise ValueError(f"no video frames decoded from {args.video!r}.")
    step = statistics.median(online_times) if online_times else float("nan")
    print(f"{count} frames in {wall:.2f} s: {count / wall:.1f} frames/s end to end (decode + preprocess + model), "
          f"online step median {1e3 * step:.2f} ms = {1.0 / step:.1f} frames/s"
          f"{'' if args.checkpoint else ' (random weights: no --checkpoint)'}")
    if args.benchmark:
        if ratios:
            print(f"benchmark over {len(ratios)} frames (first {args.warmup} left out): online step "
                  f"{1e3 * step:.2f} ms, plain 2D {1e3 * statistics.median(plain_times):.2f} ms per frame; "
                  f"median paired ratio online/2D = {statistics.median(ratios):.3f}")
        else:
            print(f"benchmark: no frames after the {args.warmup} warm-up frames; use a longer video or --warmup 0")
    return 0

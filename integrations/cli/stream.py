"""``tsm-surgery stream``: run videos, cameras and network streams frame by frame through an online TSM network.

Every source (a file, ``/dev/videoN``, an ``rtsp/tcp/udp/http(s)://`` URL) is a stream; all
streams go through one batched online step per tick. Per frame the top-k classes are printed
(``--quiet``: only the summary), then per stream the frames per second, the latency per part
(decode, preprocess, model step, post-processing; p50/p95) and, for live sources, the lag behind
real time. See docs/live.md.

Example::

    tsm-surgery stream video.mp4 --model timm:mobilenetv2_100 --topk 3 --benchmark
    tsm-surgery stream /dev/video0 --model timm:mobilenetv2_100 --smooth avg:12 --hysteresis 6
    tsm-surgery stream --engine openvino mbv2_int8.json video.mp4 --smooth avg:12
    tsm-surgery stream rtsp://cam1/live rtsp://cam2/live --config cfg.py --checkpoint ckpt.pth --events ev.jsonl
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading

import torch

from tsm_surgery.cli import non_negative_int, positive_int
from tsm_surgery.integrations.export.runtime import ENGINES
from tsm_surgery.integrations.streaming.annotate import Annotator
from tsm_surgery.integrations.streaming.batch import StreamBatch
from tsm_surgery.integrations.streaming.engine import StepEngine
from tsm_surgery.integrations.streaming.loop import FrameLoop, FrameResult
from tsm_surgery.integrations.streaming.post import ClassMask, Hysteresis, PostProcess, parse_smoothing
from tsm_surgery.integrations.streaming.sources import Source, redact
from tsm_surgery.integrations.streaming.stream import MAX_FRAME_SIZE, Preprocess, build_models

__all__ = ["add_arguments", "run"]


def frame_size(text: str) -> int:
    """argparse type: a frame side in pixels, 1 to :data:`MAX_FRAME_SIZE`."""
    value = positive_int(text)
    if value > MAX_FRAME_SIZE:
        raise argparse.ArgumentTypeError(f"{text} px is larger than {MAX_FRAME_SIZE} px (a frame would take "
                                         f"{3 * 4 * value * value / 1e9:.1f} GB); video networks run at 112-448 px")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="video files, capture devices (/dev/video0) or URLs (rtsp://, tcp://, udp://, http(s)://)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="timm:NAME or torchvision:NAME (random weights unless --checkpoint)")
    model.add_argument("--config", help="an MMAction2 config whose backbone is TSMSurgeryBackbone(direction='uni')")
    model.add_argument("--engine", choices=ENGINES,
                       help="run an exported online step in this runtime instead: the first SOURCE is the sidecar "
                            "SIDECAR.json that tsm-surgery export wrote (float32 or --int8); it sets the "
                            "preprocessing")
    parser.add_argument("--checkpoint", help="weights (state_dict for --model, MMAction2 checkpoint for --config)")
    parser.add_argument("--num-classes", type=positive_int,
                        help="classifier size for --model (default: the model's own)")
    parser.add_argument("--shift-div", type=positive_int, default=8,
                        help="1/shift_div of the channels move (default 8)")
    parser.add_argument("--uni-slot", choices=("past", "first"),
                        help="for --model: channels read from the previous frame: 'past' = [fold, 2*fold) "
                             "(default), 'first' = [0, fold) as the paper's online demo (default for its checkpoint)")
    parser.add_argument("--size", type=frame_size,
                        help=f"frame side after centre crop and resize (default: model's input size; at most "
                             f"{MAX_FRAME_SIZE})")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="weights and frames in this dtype, the caches follow (default float32)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    live = parser.add_argument_group("sources")
    live.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=None,
                      help="drop frames when the model falls behind (default: on for devices and URLs, off for "
                           "files; on for a file paces it by its timestamps)")
    live.add_argument("--drop", choices=("oldest", "every-k"), default="oldest",
                      help="real-time drop policy: 'oldest' keeps the newest --buffer frames; 'every-k' keeps one "
                           "frame in --every (a regular time step), then drops the oldest (default oldest)")
    live.add_argument("--every", type=positive_int, default=2, help="k of --drop every-k (default 2)")
    live.add_argument("--buffer", type=positive_int, default=1, help="frames held per real-time stream (default 1)")
    live.add_argument("--timeout", type=_positive_float, default=5.0,
                      help="seconds to wait to connect or for data before a source counts as stalled (default 5)")
    live.add_argument("--reconnect", type=non_negative_int, default=5,
                      help="reconnection attempts in a row for a network source, with doubling backoff (default 5)")
    live.add_argument("--max-frames", type=positive_int, help="stop each stream after this many decoded frames")
    live.add_argument("--duration", type=_positive_float, help="stop after this many seconds")
    post = parser.add_argument_group("post-processing")
    post.add_argument("--smooth", help="avg:K (mean of the last K frames' logits) or ema:ALPHA (default none)")
    post.add_argument("--hysteresis", type=positive_int, metavar="M",
                      help="announce a class after it led M frames in a row; another must lead as long to replace it")
    post.add_argument("--threshold", type=float, default=0.0,
                      help="a class leads only with at least this probability (with --hysteresis; default 0)")
    post.add_argument("--ignore-classes", help="comma-separated class indices or names never reported")
    post.add_argument("--classes", help="comma-separated class indices or names: the only ones reported")
    out = parser.add_argument_group("outputs")
    out.add_argument("--topk", type=positive_int, default=5, help="classes printed per frame (default 5)")
    out.add_argument("--labels", help="text file with one class name per line, as many as the network's classes")
    out.add_argument("--quiet", action="store_true", help="print only the summary")
    out.add_argument("--json", metavar="PATH", help="one JSON line per frame per stream ('-': stdout)")
    out.add_argument("--events", metavar="PATH",
                     help="hysteresis events as JSON lines {stream, class, start_s, end_s, score} ('-': stdout)")
    out.add_argument("--annotate", metavar="OUT.mp4",
                     help="each stream's video with top-k labels and score bars (OUT.mp4, or OUT.N.mp4 per stream)")
    parser.add_argument("--benchmark", action="store_true",
                        help="also time the plain 2D model on each tick; report the median online/2D ratio")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="frames per stream left out of the timing statistics (default 2)")


def _read_labels(path: str, num_classes: int) -> list[str]:
    with open(path) as f:
        labels = [line.strip() for line in f.read().splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if len(labels) != num_classes:
        raise ValueError(f"--labels {path} has {len(labels)} names but the network has {num_classes} classes; "
                         "give one name per line, in class order.")
    return labels


def _class_list(text: str | None, labels: list[str] | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    classes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item.isdigit():
            classes.append(int(item))
        elif labels and item in labels:
            classes.append(labels.index(item))
        else:
            raise ValueError(f"{flag}: {item!r} is neither a class index nor a name in --labels.")
    return classes


def _annotate_paths(path: str, count: int) -> list[str]:
    if count == 1:
        return [path]
    root, ext = os.path.splitext(path)
    return [f"{root}.{i}{ext or '.mp4'}" for i in range(count)]


def _topk_line(result: FrameResult, k: int, labels: list[str] | None, prefix: str) -> str:
    values, classes = result.probs.topk(min(k, result.probs.numel()))
    names = [labels[c] if labels else str(c) for c in classes.tolist()]
    tops = "  ".join(f"{n}:{v:.3f}" for n, v in zip(names, values.tolist()))
    lag = "" if result.lag_s is None else f"  lag {result.lag_s:.3f} s"
    return f"{prefix}frame {result.frame.index:5d}  {1.0 / result.step_s:7.1f} fps  top-{len(names)}: {tops}{lag}"


class _Outputs:
    """Printed lines, JSON lines, events and annotated videos for the frame loop."""

    def __init__(self, args: argparse.Namespace, sources: list[Source], labels: list[str] | None,
                 stack: contextlib.ExitStack):
        self.args, self.labels, self.multi, self.stack = args, labels, len(sources) > 1, stack
        self.json = self._open(args.json, stack)
        self.events = self._open(args.events, stack)
        self.sources = {s.name: s for s in sources}
        paths = _annotate_paths(args.annotate, len(sources)) if args.annotate else []
        self.annotate_paths = dict(zip(self.sources, paths))
        self.annotators: dict[str, Annotator] = {}

    @staticmethod
    def _open(path: str | None, stack: contextlib.ExitStack):
        if path is None:
            return None
        return sys.stdout if path == "-" else stack.enter_context(open(path, "w"))

    def result(self, result: FrameResult) -> None:
        if not self.args.quiet:
            print(_topk_line(result, self.args.topk, self.labels, f"[{result.stream}] " if self.multi else ""),
                  flush=True)
        if self.json is not None:
            self.json.write(json.dumps(self._record(result)) + "\n")
        self.write_events(result.events)
        if result.stream in self.annotate_paths:
            self._annotator(result.stream).write(result.frame.image, result.probs, self.labels, result.announced)

    def _annotator(self, stream: str) -> Annotator:
        """Opened at the stream's first frame, when its frame rate is known."""
        if stream not in self.annotators:
            fps = self.sources[stream].fps or 25.0
            annotator = Annotator(self.annotate_paths[stream], fps=fps, topk=min(self.args.topk, 5))
            self.annotators[stream] = self.stack.enter_context(annotator)
        return self.annotators[stream]

    def _record(self, result: FrameResult) -> dict:
        values, classes = result.probs.topk(min(self.args.topk, result.probs.numel()))
        top = [{"class": c, "score": round(v, 6), **({"label": self.labels[c]} if self.labels else {})}
               for c, v in zip(classes.tolist(), values.tolist())]
        return {"stream": result.stream, "frame": result.frame.index, "time_s": round(result.frame.time_s, 4),
                "top": top, "announced": result.announced,
                "lag_s": None if result.lag_s is None else round(result.lag_s, 4),
                "ms": {part: round(1e3 * value, 3) for part, value in result.times.items()}}

    def write_events(self, events) -> None:
        if self.events is not None:
            for event in events:
                self.events.write(json.dumps(event.to_dict()) + "\n")
            self.events.flush()

    def end(self, name: str, events) -> None:
        self.write_events(events)


def _sources(args: argparse.Namespace, say) -> list[Source]:
    sources, wake = [], threading.Event()
    for spec in args.sources:
        realtime = not _is_file(spec) if args.realtime is None else args.realtime
        try:  # without real time the buffer only smooths decoding: the reader waits when it is full
            source = Source(spec, realtime=args.realtime, drop=args.drop, every=args.every,
                            buffer=args.buffer if realtime else 4,
                            timeout_s=args.timeout, reconnect=args.reconnect, max_frames=args.max_frames, wake=wake)
            source.check()
        except (OSError, ValueError) as err:
            say(f"tsm-surgery stream: {redact(str(err), spec)}")
            continue
        sources.append(source)
    seen: dict[str, int] = {}
    for source in sources:  # a source given twice is two streams: name them apart
        seen[source.name] = seen.get(source.name, 0) + 1
        if seen[source.name] > 1:
            source.name = f"{source.name}#{seen[source.name]}"
    return sources


def _is_file(spec: str) -> bool:
    return "://" not in spec and not spec.startswith("/dev/video")


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    engine, preprocess, plain = _engine_of_sidecar(args) if args.engine else _engine_of_model(args)
    dtype = getattr(torch, args.dtype)
    sources = _sources(args, say)
    if not sources:
        return 1
    probe, _ = engine.step(preprocess(_blank()).to(dtype), engine.init_state(1))
    num_classes = probe.shape[-1]
    labels = _read_labels(args.labels, num_classes) if args.labels else None
    ignore = _class_list(args.ignore_classes, labels, "--ignore-classes") or []
    keep = _class_list(args.classes, labels, "--classes")
    mask = ClassMask(num_classes, ignore, keep) if ignore or keep is not None else None
    parse_smoothing(args.smooth)  # checked before any stream starts

    def make_post(name: str) -> PostProcess:
        hysteresis = Hysteresis(args.hysteresis, args.threshold) if args.hysteresis else None
        return PostProcess(name, mask=mask, smoothing=parse_smoothing(args.smooth), hysteresis=hysteresis,
                           labels=labels)

    with contextlib.ExitStack() as stack:
        outputs = _Outputs(args, sources, labels, stack)
        loop = FrameLoop(sources, StreamBatch(engine), preprocess, make_post, outputs.result, outputs.end,
                         say, warmup=args.warmup, duration_s=args.duration, dtype=dtype,
                         plain=plain if args.benchmark else None)
        started = _now()
        stats = loop.run()
        wall = _now() - started
    _summary(args, loop, stats, wall)
    return 1 if len(sources) < len(args.sources) or any(s.failed for s in stats.values()) else 0


def _engine_of_model(args: argparse.Namespace) -> tuple[StepEngine, Preprocess, object]:
    """``--model``/``--config``: the PyTorch online network, in ``--dtype``."""
    if not (args.model or args.config):
        raise ValueError("give the network: --model NAME, --config CFG.py, or --engine RUNTIME SIDECAR.json.")
    models = build_models(args)
    models.cast(getattr(torch, args.dtype))
    return models.engine(), models.preprocess, models.plain


def _engine_of_sidecar(args: argparse.Namespace) -> tuple[StepEngine, Preprocess, None]:
    """``--engine``: the first source is an export's sidecar; its runner is the step, its preprocess the frames'."""
    from tsm_surgery.integrations.export.runtime import OnlineRunner, load

    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--num-classes", args.num_classes),
                                      ("--size", args.size), ("--uni-slot", args.uni_slot),
                                      ("--benchmark", args.benchmark)) if value]
    if args.dtype != "float32":
        given.append("--dtype")
    if given:
        raise ValueError(f"{', '.join(given)}: with --engine the exported artifact fixes the network, weights, "
                         "size and dtype; drop them (or stream --model instead).")
    sidecar, *videos = args.sources
    if not sidecar.endswith(".json") or not videos:
        raise ValueError(f"--engine {args.engine}: the first SOURCE is the export's sidecar .json, then the videos "
                         f"(got {sidecar!r} first{'' if videos else ' and no video'}).")
    runner = load(sidecar, engine=args.engine, threads=args.threads)
    if not isinstance(runner, OnlineRunner):
        raise ValueError(f"{sidecar} is an offline (clip) export; stream needs the online step: "
                         "tsm-surgery export --online.")
    args.sources = videos
    pre = runner.sidecar["preprocess"]
    scale = pre.get("scale")  # "RGB in [0, 1]" (what export writes) or a number to divide by
    preprocess = Preprocess(pre["size"], pre["mean"], pre["std"],
                            255.0 if scale is None or isinstance(scale, str) else float(scale),
                            flip_channels=bool(pre.get("flip_channels", False)))
    return runner.step_engine(), preprocess, None


def _blank():
    import numpy as np

    return np.zeros((8, 8, 3), np.uint8)


def _now() -> float:
    import time

    return time.perf_counter()


def _summary(args: argparse.Namespace, loop: FrameLoop, stats: dict, wall: float) -> None:
    count = sum(s.frames for s in stats.values())
    if count == 0:
        return
    weights = "" if args.checkpoint or args.engine else " (random weights: no --checkpoint)"
    if loop.step_times:
        step = statistics.median(loop.step_times)
        step_text = f"online step median {1e3 * step:.2f} ms = {1.0 / step:.1f} steps/s"
    else:
        step_text = f"no step timed after the {args.warmup} warm-up frames (use a longer video or --warmup 0)"
    print(f"{count} frames in {wall:.2f} s: {count / wall:.1f} frames/s end to end (decode + preprocess + model), "
          f"{len(stats)} stream(s), {step_text}{weights}")
    for line in loop.summary():
        print(line)
    if args.benchmark:
        if loop.ratios:
            print(f"benchmark over {len(loop.ratios)} steps (first {args.warmup} frames left out): online step "
                  f"{1e3 * statistics.median(loop.step_times):.2f} ms, plain 2D "
                  f"{1e3 * statistics.median(loop.plain_times):.2f} ms per step; "
                  f"median paired ratio online/2D = {statistics.median(loop.ratios):.3f}")
        else:
            print(f"benchmark: no frames after the {args.warmup} warm-up frames; use a longer video or --warmup 0")

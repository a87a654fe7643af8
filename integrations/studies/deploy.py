"""``tsm-surgery bench --deploy``: the TSM network in each CPU runtime, against the same runtime's 2D network.

For every model and runtime (onnxruntime, OpenVINO float32 and bfloat16, ExecuTorch XNNPACK), from
one set of weights:

* **online step**: per-frame latency of the exported online step (caches in and out, fed back by
  :class:`~tsm_surgery.integrations.export.runtime.OnlineRunner`) against the same runtime's plain
  2D network on one frame, paired and interleaved (:func:`~.bench.measure.paired_ratios`), with
  the A/A control (a second copy of the 2D artifact) showing the noise;
* **clip throughput**: clips of ``n_segments`` frames per second through the exported clip network;
* **streaming equality**: the runtime's online outputs on a ``clip_frames``-frame clip against
  PyTorch's offline uni network on the whole clip, relative to its largest output.

* **int8** (``int8=True``, float32 runtimes): the runtime's static int8 online step
  (:func:`~tsm_surgery.integrations.export.export_int8_set`, calibrated on the demo's videos)
  against the same runtime's float32 step, paired the same way (target on AVX-512 VNNI: <= 0.6x),
  and how far its streamed outputs are from the float32 step's on the same clip.

Accuracy on a trained model is :mod:`.deploy_accuracy`'s (``bench --deploy-accuracy``).
The report is the ``deploy`` section of ``docs/BENCHMARKS.md`` (:func:`~.bench.merge_sections`).

Example::

    tsm-surgery bench --deploy --quick --deploy-runtimes onnx,openvino
"""

import datetime
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import tsm_surgery
from tsm_surgery.integrations.export import export_int8_set, export_set, load, open_engine, target_module
from tsm_surgery.integrations.export.artifacts import require_target, sidecar_path
from tsm_surgery.integrations.models import build_model, randomize_norms
from tsm_surgery.integrations.studies.bench.machine import describe
from tsm_surgery.integrations.studies.bench.measure import CONTROL, paired_ratios, wall_time
from tsm_surgery.integrations.studies.bench.report import write_section

__all__ = ["DeploySettings", "DeployResult", "Int8Row", "QUICK", "RUNTIMES", "run_deploy", "render", "write",
           "describe"]

# runtime name -> (export target, run-time precision)
RUNTIMES = {"onnx": ("onnx", "f32"), "openvino": ("openvino", "f32"), "openvino-bf16": ("openvino", "bf16"),
            "executorch": ("executorch", "f32")}
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte"}


@dataclass
class DeploySettings:
    models: tuple[str, ...] = ("timm:mobilenetv2_100", "timm:resnet50")
    runtimes: tuple[str, ...] = tuple(RUNTIMES)
    size: int = 224
    n_segments: int = 8
    clip_frames: int = 16
    rounds: int = 30
    clip_rounds: int = 10
    threads: int | None = None
    checkpoint: str | None = None  # one state_dict for every model (same weights in every runtime)
    seed: int = 0
    int8: bool = True  # int8 rows for the float32 runtimes
    calibration_clips: int = 8  # demo videos the int8 step is calibrated on


QUICK = dict(models=("timm:mobilenetv2_100", "timm:resnet18"), size=32, n_segments=4, clip_frames=8, rounds=5,
             clip_rounds=3, calibration_clips=3)


@dataclass
class Row:
    model: str
    runtime: str
    step_ms: float
    plain_ms: float
    ratio: float
    ratio_iqr: tuple[float, float]
    control: float
    clips_per_s: float
    equality: float
    export_s: float


@dataclass
class Int8Row:
    model: str
    runtime: str
    int8_ms: float
    float_ms: float
    ratio: float
    ratio_iqr: tuple[float, float]
    difference: float  # int8 stream vs float32 stream, relative to the float32 stream's largest output
    top1_agreement: float  # frames whose top-1 class is the float32 step's
    quantize_s: float


@dataclass
class DeployResult:
    settings: DeploySettings
    rows: list[Row] = field(default_factory=list)
    int8_rows: list[Int8Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    machine: Any = None
    elapsed_s: float = 0.0


def _model(spec: str, settings: DeploySettings) -> torch.nn.Module:
    torch.manual_seed(settings.seed)
    model = build_model(spec, checkpoint=settings.checkpoint).eval()
    # Random weights: timm zero-initialises each residual branch's last norm, so the shift would change nothing.
    return model if settings.checkpoint else randomize_norms(model)


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@torch.no_grad()
def _measure(spec: str, runtime: str, settings: DeploySettings, folder: str,
             calibration: list[torch.Tensor] | None = None, int8_rows: list[Int8Row] | None = None,
             refused: dict[str, str] | None = None) -> Row:
    target, precision = RUNTIMES[runtime]
    frame_shape = (3, settings.size, settings.size)
    model = _model(spec, settings)
    uni = tsm_surgery.convert(model, n_segments=settings.clip_frames, direction="uni").eval()
    clip_net = tsm_surgery.convert(model, n_segments=settings.n_segments, direction="uni").eval()
    online = tsm_surgery.to_online(tsm_surgery.convert(model, n_segments=settings.n_segments, direction="uni"),
                                   frame_shape=frame_shape)
    base = f"{folder}/{spec.split(':')[-1]}_{target}"
    start = time.perf_counter()
    kwargs = {"exporter": "legacy"} if target == "onnx" else {}
    export_set(target, online, base + "_online" + SUFFIX[target], frame_shape=frame_shape, force=True, **kwargs)
    export_set(target, clip_net, base + "_clip" + SUFFIX[target], frame_shape=frame_shape, force=True, **kwargs)
    frame = torch.randn(1, *frame_shape)
    plain_path = base + "_2d" + SUFFIX[target]
    target_module(target).write(model, (frame,), plain_path, ["frames"], ["output"], **kwargs)
    export_s = time.perf_counter() - start

    step = load(base + "_online.json", precision=precision, threads=settings.threads)
    clips = load(base + "_clip.json", precision=precision, threads=settings.threads)
    plain = open_engine(target, plain_path, precision, settings.threads)
    control = open_engine(target, plain_path, precision, settings.threads)

    clip = torch.randn(settings.clip_frames, *frame_shape)
    expected = uni(clip)
    step.reset()
    streamed = torch.cat([step.step(clip[t:t + 1]) for t in range(settings.clip_frames)])
    equality = _rel(streamed, expected)

    x = frame.numpy()
    step.reset()
    timed = paired_ratios({"2d": lambda: plain.run([x]), CONTROL: lambda: control.run([x]),
                           "online": lambda: step.step(frame)}, "2d", rounds=settings.rounds, seed=settings.seed)
    one_clip = torch.randn(settings.n_segments, *frame_shape).numpy()
    clips.run(one_clip)
    clip_s = statistics.median(wall_time(lambda: clips.run(one_clip)) for _ in range(settings.clip_rounds))
    online_t = timed["online"]
    if calibration is not None and precision == "f32":
        net = tsm_surgery.convert(model, n_segments=settings.n_segments, direction="uni").eval()
        try:
            int8_rows.append(_measure_int8(spec, runtime, net, step, streamed, clip, calibration, settings,
                                           base + "_online_int8" + SUFFIX[target]))
        except RuntimeError as err:  # the export refuses an int8 artifact that does not compute its model
            refused[f"{spec} {runtime} int8"] = str(err)
    return Row(spec, runtime, 1e3 * online_t["median_s"], 1e3 * timed["2d"]["median_s"], online_t["ratio"],
               (online_t["ratio_p25"], online_t["ratio_p75"]), timed[CONTROL]["ratio"], 1.0 / clip_s, equality,
               export_s)


@torch.no_grad()
def _measure_int8(spec: str, runtime: str, net: "tsm_surgery.TSMNet", float_step: Any, float_out: torch.Tensor,
                  clip: torch.Tensor, calibration: list[torch.Tensor], settings: DeploySettings, path: str) -> Int8Row:
    """The int8 online step of ``net`` against the float32 step, in the same runtime, on the same frames."""
    frame_shape = tuple(clip.shape[1:])
    start = time.perf_counter()
    export_int8_set(RUNTIMES[runtime][0], net, path, calibration, frame_shape=frame_shape, force=True)
    quantize_s = time.perf_counter() - start
    step = load(sidecar_path(path), threads=settings.threads)
    step.reset()
    streamed = torch.cat([step.step(clip[t:t + 1]) for t in range(clip.shape[0])])
    agreement = float((streamed.argmax(-1) == float_out.argmax(-1)).float().mean())
    frame = clip[:1]
    step.reset()
    float_step.reset()
    timed = paired_ratios({"f32": lambda: float_step.step(frame), "int8": lambda: step.step(frame)}, "f32",
                          rounds=settings.rounds, seed=settings.seed)
    t = timed["int8"]
    return Int8Row(spec, runtime, 1e3 * t["median_s"], 1e3 * timed["f32"]["median_s"], t["ratio"],
                   (t["ratio_p25"], t["ratio_p75"]), _rel(streamed, float_out), agreement, quantize_s)


def _calibration(settings: DeploySettings) -> list[torch.Tensor] | None:
    if not settings.int8:
        return None
    from tsm_surgery.integrations.streaming.calibration import load_calibration

    return load_calibration(None, size=settings.size, n_frames=settings.n_segments,
                            max_clips=settings.calibration_clips)


def run_deploy(settings: DeploySettings, log: Any = print) -> DeployResult:
    """Measures every model in every runtime that is installed; a missing runtime is skipped with its reason."""
    unknown = [r for r in settings.runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"runtime {unknown[0]!r}: choose from {', '.join(RUNTIMES)}.")
    result = DeployResult(settings, machine=describe(torch.device("cpu")))
    start = time.perf_counter()
    calibration = _calibration(settings)
    with tempfile.TemporaryDirectory(prefix="tsm-deploy-") as folder:
        for runtime in settings.runtimes:
            try:
                require_target(RUNTIMES[runtime][0])
            except ImportError as err:
                result.skipped[runtime] = str(err)
                continue
            for spec in settings.models:
                row = _measure(spec, runtime, settings, folder, calibration, result.int8_rows, result.skipped)
                log(f"{spec} {runtime}: step {row.step_ms:.2f} ms, 2D {row.plain_ms:.2f} ms, ratio {row.ratio:.3f}, "
                    f"{row.clips_per_s:.1f} clips/s, equality {row.equality:.1e}")
                result.rows.append(row)
                if result.int8_rows and result.int8_rows[-1].runtime == runtime and result.int8_rows[-1].model == spec:
                    q = result.int8_rows[-1]
                    log(f"{spec} {runtime} int8: step {q.int8_ms:.2f} ms, f32 {q.float_ms:.2f} ms, int8/f32 "
                        f"{q.ratio:.3f}, difference {q.difference:.1e}, top-1 agreement {q.top1_agreement:.2f}")
    result.machine.finish()
    result.elapsed_s = time.perf_counter() - start
    return result


def _fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


def render(r: DeployResult) -> str:
    """The ``deploy`` section of BENCHMARKS.md."""
    s, m = r.settings, r.machine
    lines = ["## Deploy: the online step and the clip network in three CPU runtimes", "",
             f"Generated by `tsm-surgery bench --deploy` ({datetime.date.today().isoformat()}), float32 unless "
             "named; regenerate with the same command.", ""]
    lines += m.lines()[:1]
    lines += [f"- load average (1/5/15 min, `/proc/loadavg`) at start {_fmt_load(m.load_start)}, at end "
              f"{_fmt_load(m.load_end)}: {m.busy_text()}; run time {r.elapsed_s:.0f} s",
              f"- frames {s.size}x{s.size}; clip network {s.n_segments} frames; streaming equality on a "
              f"{s.clip_frames}-frame clip; {s.rounds} paired rounds per latency ratio; "
              f"{'weights from ' + s.checkpoint if s.checkpoint else 'random weights (norms randomised)'}", "",
              "**step / 2D**: median over rounds of (online step, caches in and out) / (the same runtime's 2D "
              "network on one frame), interquartile range in brackets; **A/A**: a second copy of the 2D artifact "
              "timed the same way (the noise). **equality**: largest difference of the runtime's streamed "
              "outputs from PyTorch's offline uni network on the whole clip, relative to its largest output "
              "(target <= 1e-4 for float32). Targets: step / 2D <= 1.05.", "",
              "| model | runtime | step ms | 2D ms | step / 2D | A/A | clips/s | equality |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in r.rows:
        lines.append(f"| `{row.model}` | {row.runtime} | {row.step_ms:.2f} | {row.plain_ms:.2f} | {row.ratio:.3f} "
                     f"({row.ratio_iqr[0]:.2f}-{row.ratio_iqr[1]:.2f}) | {row.control:.3f} | "
                     f"{row.clips_per_s:.1f} | {row.equality:.1e} |")
    lines.append("")
    for runtime, why in r.skipped.items():
        lines.append(f"- {runtime}: not measured: {why}")
    lines += _int8_lines(r)
    lines.append("- accuracy of trained models, float32 and int8 per runtime: the deploy-accuracy section "
                 "(`tsm-surgery bench --deploy-accuracy RUN_DIR`).")
    return "\n".join(lines) + "\n"


def _int8_lines(r: DeployResult) -> list[str]:
    if not r.int8_rows:
        return ["- int8: not measured in this run."]
    from tsm_surgery.integrations.export.int8_cpu import saturating_int8

    form = ("portable weights (this CPU has no VNNI: onnxruntime uint8 weights, OpenVINO 7-bit)" if saturating_int8()
            else "full-range int8 weights (this CPU has VNNI)")
    lines = [f"**int8** (static, calibrated on {r.settings.calibration_clips} demo videos, {form}; the online step): "
             "**int8 / f32**: median over paired rounds of the int8 step / the same runtime's float32 step "
             "(target <= 0.6 on AVX-512 VNNI); **difference**: the int8 stream's largest difference from the "
             "float32 stream on the same clip, relative to its largest output; **top-1 agreement**: frames "
             "whose top-1 class is the float32 step's (random weights have small margins).", "",
             "| model | runtime | int8 ms | f32 ms | int8 / f32 | difference | top-1 agreement | quantize s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in r.int8_rows:
        lines.append(f"| `{row.model}` | {row.runtime} | {row.int8_ms:.2f} | {row.float_ms:.2f} | {row.ratio:.3f} "
                     f"({row.ratio_iqr[0]:.2f}-{row.ratio_iqr[1]:.2f}) | {row.difference:.1e} | "
                     f"{row.top1_agreement:.2f} | {row.quantize_s:.0f} |")
    return lines + [""]


def write(path: str, r: DeployResult) -> str:
    """Renders ``r`` into the ``deploy`` section of ``path`` (other sections kept); returns the section."""
    section = render(r)
    write_section(path, "deploy", section)
    return section

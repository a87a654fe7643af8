"""``tsm-surgery bench --deploy-accuracy RUN_DIR``: the demo's trained TSM models in each runtime, float32 and int8.

For each trained TSM model of a ``tsm-surgery demo`` run directory (``tsm`` and ``tsm-uni``), the
recognizer becomes one clip network: the converted backbone followed by the head's pooling and
classifier, per frame (TSNHead's average consensus over frames commutes with its linear
classifier, so the mean of the per-frame logits ranks the classes as the recognizer does). That
network is exported to each runtime in float32 and, calibrated on training videos, in int8; the
test videos, decoded by the config's own test pipeline, are classified by each. Reported: test
top-1 per runtime and precision, and the fraction of test videos whose top-1 class is PyTorch
float32's (targets: int8 within 1 point of float32, agreement >= 98%).

Example::

    tsm-surgery demo --models tsm,tsm-uni --out-dir work_dirs/demo/run
    tsm-surgery bench --deploy-accuracy work_dirs/demo/run
"""

import datetime
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tsm_surgery
from tsm_surgery.integrations.export import export_int8_set, export_set, int8, load
from tsm_surgery.integrations.export.artifacts import require_target, sidecar_path
from tsm_surgery.integrations.export.writer import SUFFIX
from tsm_surgery.integrations.mmaction.recognizer import frame_classifier, load_recognizer
from tsm_surgery.integrations.studies.bench.report import write_section

__all__ = ["AccuracyRow", "AccuracyResult", "measure_accuracy", "render", "write"]

MODELS = ("tsm", "tsm-uni")
TARGETS = ("onnx", "openvino", "executorch")


@dataclass
class AccuracyRow:
    model: str
    runtime: str  # "pytorch" for the reference
    precision: str
    top1: float
    agreement: float  # test videos whose top-1 class is PyTorch float32's


@dataclass
class AccuracyResult:
    run_dir: str
    videos: int = 0
    calibration_clips: int = 0
    rows: list[AccuracyRow] = field(default_factory=list)
    recognizer_top1: dict[str, float] = field(default_factory=dict)  # the demo's own MMAction2 test
    skipped: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _checkpoint(work_dir: Path) -> Path:
    pointer = work_dir / "last_checkpoint"
    if pointer.is_file():  # mmengine writes the path as the run named it (maybe relative to another directory)
        return work_dir / Path(pointer.read_text().strip()).name
    found = sorted(work_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    if not found:
        raise FileNotFoundError(f"{work_dir}: no checkpoint. Hint: pass the run directory of a finished "
                                "`tsm-surgery demo` (it holds tsm/ and tsm-uni/ with their last epoch).")
    return found[-1]


def _recognizer(run_dir: Path, name: str) -> tuple[nn.Module, Any]:
    from tsm_surgery.integrations.demo.pipeline import build_cfg

    cfg = build_cfg(name, run_dir / "data", run_dir / name, epochs=1, seed=0)
    return load_recognizer(cfg, str(_checkpoint(run_dir / name)), checkpoint_flag=f"{name} checkpoint"), cfg


def _clips(cfg: Any, split: str, limit: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Clips of ``split`` decoded by the config's test pipeline and normalised by its preprocessor."""
    from mmaction.registry import DATASETS

    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg["ann_file"] = str(Path(cfg.test_dataloader.dataset.ann_file).with_name(f"{split}.txt"))
    dataset = DATASETS.build(dataset_cfg)
    pre = cfg.model.data_preprocessor
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    clips, labels = [], []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[i]
        clips.append((item["inputs"].float() - mean) / std)
        labels.append(int(item["data_samples"].gt_label))
    return clips, labels


def _top1(logits: list[np.ndarray]) -> np.ndarray:
    return np.array([np.asarray(x).mean(0).argmax() for x in logits])


def _row(name: str, runtime: str, precision: str, predicted: np.ndarray, labels: np.ndarray,
          reference: np.ndarray) -> AccuracyRow:
    return AccuracyRow(name, runtime, precision, float((predicted == labels).mean()),
                       float((predicted == reference).mean()))


def _in_runtime(target: str, net: tsm_surgery.TSMNet, clips: list[torch.Tensor], calibration: list[torch.Tensor],
                folder: str, refused: dict[str, str]) -> dict[str, np.ndarray]:
    """Top-1 of every clip through ``target``'s float32 and int8 clip networks (an int8 refusal goes in ``refused``)."""
    frame_shape = tuple(clips[0].shape[1:])
    path = f"{folder}/{target}_f32{SUFFIX[target]}"
    export_set(target, net, path, frame_shape=frame_shape, force=True,
               **({"exporter": "legacy"} if target == "onnx" else {}))
    runs = {"f32": load(sidecar_path(path))}
    path = f"{folder}/{target}_int8{SUFFIX[target]}"
    try:
        export_int8_set(target, net, path, calibration, frame_shape=frame_shape, online=False, force=True)
        runs["int8"] = load(sidecar_path(path))
    except RuntimeError as err:  # the export refuses an int8 artifact that does not compute its model
        refused[f"{target} int8"] = str(err)
    return {precision: _top1([runner.run(clip) for clip in clips]) for precision, runner in runs.items()}


@torch.no_grad()
def measure_accuracy(run_dir: str, targets: tuple[str, ...] = TARGETS, calibration_clips: int = 16,
                     log: Any = print) -> AccuracyResult:
    """Test top-1 of the demo's ``tsm`` and ``tsm-uni`` in PyTorch and in each installed runtime."""
    start = time.perf_counter()
    root = Path(run_dir)
    result = AccuracyResult(str(root), calibration_clips=calibration_clips)
    summary = root / "summary.json"
    if summary.is_file():
        models = json.loads(summary.read_text()).get("models", {})
        result.recognizer_top1 = {k: float(v["test"]["acc/top1"]) for k, v in models.items() if k in MODELS}
    for target in targets:
        try:
            require_target(target)
        except ImportError as err:
            result.skipped[target] = str(err)
    with tempfile.TemporaryDirectory(prefix="tsm-accuracy-") as folder:
        for name in MODELS:
            recognizer, cfg = _recognizer(root, name)
            clips, labels = _clips(cfg, "test")
            calibration, _ = _clips(cfg, "train", calibration_clips)
            result.calibration_clips = len(calibration)
            frame_shape = tuple(clips[0].shape[1:])
            net = frame_classifier(recognizer, frame_shape, name)
            reference = _top1([net(clip).numpy() for clip in clips])
            truth = np.array(labels)
            result.videos = len(clips)
            result.rows.append(_row(name, "pytorch", "f32", reference, truth, reference))
            quantized = int8.quantize_pytorch(net, calibration, frame_shape, form="clip")
            result.rows.append(_row(name, "pytorch (PT2E)", "int8", _top1([quantized(c).numpy() for c in clips]),
                                     truth, reference))
            for target in (t for t in targets if t not in result.skipped):
                for precision, predicted in _in_runtime(target, net, clips, calibration, folder,
                                                        result.skipped).items():
                    row = _row(name, target, precision, predicted, truth, reference)
                    result.rows.append(row)
                    log(f"{name} {target} {precision}: top-1 {100 * row.top1:.1f}%, agreement with PyTorch "
                        f"float32 {100 * row.agreement:.1f}%")
    result.elapsed_s = time.perf_counter() - start
    return result


def render(r: AccuracyResult) -> str:
    """The ``deploy-accuracy`` section of BENCHMARKS.md."""
    lines = ["## Deploy accuracy: the demo's trained TSM models, float32 and int8, in each runtime", "",
             f"Generated by `tsm-surgery bench --deploy-accuracy RUN_DIR` ({datetime.date.today().isoformat()}) "
             f"on a `tsm-surgery demo` run ({r.videos} test videos, 64x64 px, 8 frames); run time "
             f"{r.elapsed_s:.0f} s. int8: static, calibrated on {r.calibration_clips} training videos, the clip "
             "network. **agreement**: test videos whose top-1 class is PyTorch float32's. Targets: int8 within "
             "1 point of float32, agreement >= 98%.", ""]
    if r.recognizer_top1:
        lines += ["The demo's own MMAction2 test of the same checkpoints: " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in r.recognizer_top1.items()) + " top-1.", ""]
    lines += ["| model | runtime | precision | top-1 | agreement |", "|---|---|---|---:|---:|"]
    lines += [f"| {row.model} | {row.runtime} | {row.precision} | {100 * row.top1:.1f}% | {100 * row.agreement:.1f}% |"
              for row in r.rows]
    lines += [""] + [f"- {target}: not measured: {why}" for target, why in r.skipped.items()]
    return "\n".join(lines).rstrip() + "\n"


def write(path: str, r: AccuracyResult) -> str:
    """Renders ``r`` into the ``deploy-accuracy`` section of ``path`` (other sections kept); returns it."""
    section = render(r)
    write_section(path, "deploy-accuracy", section)
    return section

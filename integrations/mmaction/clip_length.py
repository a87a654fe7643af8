"""The clip length in one place: the pipeline's ``SampleFrames`` decides it.

TSM configs name the number of frames three times: the pipeline's ``num_clips``, the
backbone's ``num_segments`` and the head's ``num_segments`` (MMAction2 #2767, #361). Change one
and forget another, and the shift mixes frames of different clips or the head averages the
wrong groups, silently. Here the pipeline is the single source:

* :func:`sync_clip_length` rewrites a config before the model is built (the runner API calls it);
* :class:`ClipLengthHook` sets the built model's backbone and head from the pipeline of the
  loop that is about to run (train, val or test), so a ``--cfg-options`` change of ``num_clips``
  or a test pipeline with another clip length is followed too.

Frames per clip ``T = num_clips * clip_len`` of the first ``SampleFrames``-like transform.
"""

from collections.abc import Iterable
from typing import Any

from mmaction.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

__all__ = ["ClipLengthHook", "sync_clip_length", "frames_per_clip"]

_TAKE_NUM_SEGMENTS = ("TSMSurgeryBackbone", "ResNetTSM", "MobileNetV2TSM", "MobileOneTSM", "TSMHead",
                      "TSMSurgeryResNet", "TSMSurgeryMobileNetV2", "TSMSurgeryMobileOne")
_SAMPLERS = ("SampleFrames", "UntrimmedSampleFrames", "DenseSampleFrames", "SampleAVAFrames")


def _type_name(kind: Any) -> str:
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def frames_per_clip(pipeline: Iterable[Any] | None) -> int | None:
    """``num_clips * clip_len`` of the pipeline's frame sampler, or None without one.

    Args:
        pipeline: a list of transform config dicts, or of built transform objects.
    """
    for step in pipeline or ():
        if isinstance(step, dict):
            if _type_name(step.get("type")) in _SAMPLERS or "num_clips" in step:
                return int(step.get("num_clips", 1)) * int(step.get("clip_len", 1))
        elif hasattr(step, "num_clips") and hasattr(step, "clip_len"):
            return int(step.num_clips) * int(step.clip_len)
    return None


def _dataset_pipeline(dataset_cfg: Any) -> list | None:
    while isinstance(dataset_cfg, dict) and "pipeline" not in dataset_cfg and "dataset" in dataset_cfg:
        dataset_cfg = dataset_cfg["dataset"]  # RepeatDataset and friends
    return dataset_cfg.get("pipeline") if isinstance(dataset_cfg, dict) else None


def sync_clip_length(cfg: Any, split: str = "train") -> int | None:
    """Sets ``model.backbone.num_segments`` and ``model.cls_head.num_segments`` from the pipeline.

    Only parts that take it are set: a ``num_segments`` key already there, or a type in
    ``TSMSurgeryBackbone``/``ResNetTSM``/``MobileNetV2TSM``/``MobileOneTSM``/``TSMHead``
    (a TSN head is left alone).

    Args:
        cfg: an mmengine ``Config`` (changed in place).
        split: whose dataloader decides: ``'train'``, ``'val'`` or ``'test'``; falls back to
            the others when that one has no frame sampler.

    Returns:
        The number of frames per clip, or None when no pipeline names one.
    """
    order = [split] + [s for s in ("train", "val", "test") if s != split]
    frames = None
    for name in order:
        loader = cfg.get(f"{name}_dataloader")
        if loader:
            frames = frames_per_clip(_dataset_pipeline(loader.get("dataset")))
        if frames:
            break
    if not frames:
        return None
    model = cfg.get("model", {})
    for part in ("backbone", "cls_head"):
        sub = model.get(part)
        if sub is None:
            continue
        takes_it = "num_segments" in sub or _type_name(sub.get("type")) in _TAKE_NUM_SEGMENTS
        if takes_it and sub.get("num_segments") != frames:
            print_log(f"clip length: model.{part}.num_segments {sub.get('num_segments', 'default')} -> {frames} "
                      f"(from {name}_dataloader's SampleFrames)", logger="current")
            sub["num_segments"] = frames
    return frames


@HOOKS.register_module()
class ClipLengthHook(Hook):
    """Keeps the backbone's and head's ``num_segments`` equal to the running loop's pipeline.

    Before each train, val and test epoch (and again after validation inside training), reads
    ``num_clips * clip_len`` from the dataloader's frame sampler and sets
    ``model.backbone.num_segments`` and ``model.cls_head.num_segments`` where they exist.

    Example:
        >>> custom_hooks = [dict(type='ClipLengthHook')]
    """

    priority = "VERY_HIGH"

    def _apply(self, runner, loader_name: str) -> None:
        try:
            loader = getattr(runner, loader_name)
        except RuntimeError:  # that loop is not configured
            return
        dataset = getattr(loader, "dataset", None)
        while dataset is not None and not hasattr(dataset, "pipeline") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        pipeline = getattr(dataset, "pipeline", None)
        frames = frames_per_clip(getattr(pipeline, "transforms", pipeline))
        if not frames:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        for part in ("backbone", "cls_head"):
            module = getattr(model, part, None)
            if module is not None and hasattr(module, "num_segments") and module.num_segments != frames:
                runner.logger.info(f"ClipLengthHook: {part}.num_segments {module.num_segments} -> {frames} "
                                   f"({loader_name} pipeline)")
                module.num_segments = frames

    def before_train(self, runner) -> None:
        self._apply(runner, "train_dataloader")

    def before_train_epoch(self, runner) -> None:
        self._apply(runner, "train_dataloader")

    def before_val_epoch(self, runner) -> None:
        self._apply(runner, "val_dataloader")

    def after_val_epoch(self, runner, metrics=None) -> None:
        train_loop = getattr(runner, "_train_loop", None)
        if train_loop is not None and not isinstance(train_loop, dict):  # validation inside training
            self._apply(runner, "train_dataloader")

    def before_test_epoch(self, runner) -> None:
        self._apply(runner, "test_dataloader")

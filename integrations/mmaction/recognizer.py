"""A trained MMAction2 recognizer outside its runner: for ``export --config`` and ``stream --config``.

:func:`load_recognizer` builds a recognizer from its config with the checkpoint's weights loaded
strictly; :func:`frame_classifier` turns its TSM backbone and head into one converted network
that classifies each frame (what the runtimes take); :func:`normalization` is its data
preprocessor's mean and std.

Example::

    recognizer = load_recognizer("tsm_uni.py", "epoch_50.pth")
    net = frame_classifier(recognizer, (3, 224, 224))      # a tsm_surgery.TSMNet
    online = tsm_surgery.to_online(net)                     # logits per frame, streamed
"""

import os
from typing import Any

import torch
from torch import nn

import tsm_surgery
from tsm_surgery.integrations.checkpoints import layout_adapter
from tsm_surgery.integrations.checkpoints.loading import load_state_dict_file

__all__ = ["load_recognizer", "tsm_backbone_net", "frame_classifier", "frame_size", "normalization"]


def load_recognizer(config: Any, checkpoint: str | None = None, flag: str = "--config",
                    checkpoint_flag: str = "--checkpoint") -> nn.Module:
    """The recognizer of ``config`` (a path or an mmengine ``Config``) on CPU, in eval mode.

    ``checkpoint`` (an MMAction2 checkpoint, or one in the paper's/MMAction2's stock layout) is
    loaded strictly: mmengine's own loader only warns on missing keys and would leave random
    weights.
    """
    from mmaction.apis import init_recognizer

    if isinstance(config, (str, os.PathLike)) and not os.path.isfile(config):
        raise FileNotFoundError(f"{flag} {str(config)!r} does not exist.")
    recognizer = init_recognizer(config, None, device="cpu")
    if checkpoint:
        load_state_dict_file(checkpoint, recognizer, source=checkpoint_flag,
                             adapt=layout_adapter(recognizer, checkpoint_flag))
    return recognizer.eval()


def tsm_backbone_net(recognizer: nn.Module, flag: str = "--config") -> tsm_surgery.TSMNet:
    """The converted network inside the recognizer's ``TSMSurgeryBackbone``, or ValueError."""
    net = getattr(recognizer.backbone, "net", None)
    if not isinstance(net, tsm_surgery.TSMNet):
        raise ValueError(f"{flag}: the backbone is {type(recognizer.backbone).__name__}, not a TSMSurgeryBackbone. "
                         "Hint: replace it by TSMSurgeryBackbone (stock TSM types: their TSMSurgery* equivalents).")
    return net


def frame_classifier(recognizer: nn.Module, frame_shape: tuple[int, int, int],
                     flag: str = "--config") -> tsm_surgery.TSMNet:
    """The recognizer's TSM backbone and its head's pooling and classifier as one converted network.

    The output is one row of class logits per frame. TSMHead's and TSNHead's average consensus over
    the frames commutes with their linear classifier, so the mean of the per-frame logits ranks the
    classes as the recognizer does. The backbone's 2D module tree is converted again with its
    settings and sites, so the weights are the trained ones (shared, not copied).

    Raises:
        ValueError: the backbone is not a ``TSMSurgeryBackbone``, has modules a 2D network cannot
            hold (temporal pooling, non-local blocks) or shifts block inputs instead of residual
            sites (MobileOne), or the head has no ``avg_pool`` and ``fc_cls``.
    """
    from ._temporal import temporal_modules

    net = tsm_backbone_net(recognizer, flag)
    backbone, head = recognizer.backbone, recognizer.cls_head
    inserted = [m for m in temporal_modules(backbone) if not isinstance(m, tsm_surgery.TemporalShift)]
    if inserted:
        raise ValueError(f"{flag}: the backbone has {len(inserted)} clip-level module(s) "
                         f"({type(inserted[0]).__name__}: temporal pooling or non-local blocks), which a per-frame "
                         "network cannot hold. Hint: export a config without temporal_pool and non_local.")
    if any(site.kind != "residual" for site in net.sites):
        raise ValueError(f"{flag}: the backbone shifts block inputs (shift_inputs=/no_residual=, e.g. MobileOne), "
                         "not residual sites; a per-frame network of it is not supported yet.")
    pool, fc = getattr(head, "avg_pool", None), getattr(head, "fc_cls", None)
    if pool is None or fc is None:
        raise ValueError(f"{flag}: the head {type(head).__name__} has no avg_pool and fc_cls; a per-frame "
                         "network needs a TSMHead/TSNHead-style head (spatial_type='avg').")
    classifier = nn.Sequential(backbone.model2d, pool, nn.Flatten(1), fc).eval()
    converted = tsm_surgery.convert(classifier, n_segments=net.n_segments, shift_div=net.shift_div,
                                    direction=net.direction, uni_slot=net.uni_slot, place=net.place,
                                    select=[f"0.{s.name}" for s in net.sites],
                                    example_input=torch.zeros(1, *frame_shape)).eval()
    if [s.name.removeprefix("0.") for s in converted.sites] != [s.name for s in net.sites]:
        raise ValueError(f"{flag}: the per-frame network's shift sites differ from the backbone's "
                         f"({len(converted.sites)} against {len(net.sites)}); please report this config.")
    return converted


def normalization(recognizer: nn.Module) -> tuple[list[float], list[float], bool]:
    """``(mean, std, to_rgb)`` of the recognizer's data preprocessor, on the 0-255 scale."""
    preprocessor = recognizer.data_preprocessor
    mean, std = getattr(preprocessor, "mean", None), getattr(preprocessor, "std", None)
    mean = [0.0, 0.0, 0.0] if mean is None else [float(v) for v in mean.flatten()]
    std = [1.0, 1.0, 1.0] if std is None else [float(v) for v in std.flatten()]
    return mean, std, bool(getattr(preprocessor, "to_rgb", False))


def frame_size(recognizer: nn.Module, default: int = 224) -> int:
    """The square crop of the config's test pipeline (``CenterCrop``/``ThreeCrop``/``TenCrop``), else ``default``."""
    cfg = getattr(recognizer, "cfg", None)  # init_recognizer keeps the config there
    if cfg is None:
        return default
    loader = cfg.get("test_dataloader") or {}
    pipeline = cfg.get("test_pipeline") or (loader.get("dataset") or {}).get("pipeline") or []
    for step in pipeline:
        crop = step.get("crop_size") if step.get("type") in ("CenterCrop", "ThreeCrop", "TenCrop") else None
        if isinstance(crop, int):
            return crop
    return default

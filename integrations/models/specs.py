"""The one model builder: ``timm:NAME``, ``torchvision:NAME``, ``mmaction:resnetNN`` or a bare timm name.

Weights are never downloaded: models are randomly initialised unless ``checkpoint=`` names a
local file, which is loaded strictly with ``weights_only=True``
(:func:`~tsm_surgery.integrations.checkpoints.loading.load_state_dict_file`).
"""

import dataclasses
import sys
from typing import Any

from torch import nn

from tsm_surgery.integrations.checkpoints import layout_adapter
from tsm_surgery.integrations.checkpoints.loading import load_state_dict_file

__all__ = ["Spec", "parse_spec", "build_model", "default_frame_size", "SOURCES"]

SOURCES = ("timm", "torchvision", "mmaction")
_FORMS = "timm:NAME, torchvision:NAME, mmaction:resnetNN or a bare timm name"


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed model spec: the library that builds it and the name that library knows it by."""

    source: str
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"

    @property
    def resnet_depth(self) -> int | None:
        """``NN`` of ``mmaction:resnetNN``; ``None`` for other sources."""
        return int(self.name[len("resnet"):]) if self.source == "mmaction" else None


def parse_spec(spec: str) -> Spec:
    """Splits ``SOURCE:NAME`` at its first colon; a spec without a colon is a timm name.

    The name keeps any further colons (``timm:hf-hub:org/model``). ``mmaction`` names are
    MMAction2's ResNet, ``resnetNN``.

    Raises:
        ValueError: an empty name, a source other than :data:`SOURCES`, or an ``mmaction`` name
            that is not ``resnetNN``; the message names the forms that work.

    Example:
        >>> parse_spec("torchvision:mobilenet_v2")
        Spec(source='torchvision', name='mobilenet_v2')
        >>> parse_spec("resnet18")
        Spec(source='timm', name='resnet18')
        >>> parse_spec("mmaction:resnet50").resnet_depth
        50
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec {spec!r} is empty; use {_FORMS} (e.g. timm:resnet18).")
    source, colon, name = spec.partition(":")
    if not colon:
        source, name = "timm", spec
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r} in {spec!r}: use {_FORMS}. "
                         f"Hint: timm:{spec} if it is a timm name.")
    if not name:
        raise ValueError(f"model spec {spec!r} names no model; use {_FORMS} (e.g. {source}:resnet18).")
    if source == "mmaction" and not (name.startswith("resnet") and name[len("resnet"):].isdigit()):
        raise ValueError(f"mmaction models are given as mmaction:resnetNN (MMAction2's ResNet), got {name!r}. "
                         "Hint: mmaction:resnet50, or timm:NAME / torchvision:NAME for other families.")
    return Spec(source, name)


def _timm(name: str, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise ValueError(f"timm has no model {name!r}. Close names: {close or 'none'}; "
                         "`python -c 'import timm; print(timm.list_models())'` lists them all.")
    return timm.create_model(name, pretrained=False, **kwargs)


def _torchvision(name: str, kwargs: dict) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as err:
        raise ValueError(f"torchvision has no model {name!r} ({err}). "
                         "torchvision.models.list_models() lists them.") from None
    return builder(weights=None, **kwargs)


def _mmaction(name: str, kwargs: dict) -> nn.Module:
    from tsm_surgery.integrations.mmaction import compat

    compat.apply()
    from mmaction.models.backbones import ResNet

    return ResNet(depth=Spec("mmaction", name).resnet_depth, **{"pretrained": None, "norm_eval": False, **kwargs})


def _note(level: int, message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def build_model(spec: str, *, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """Creates a model from ``timm:resnet18``, ``torchvision:mobilenet_v2``, ``mmaction:resnet50`` or ``resnet18``.

    Args:
        spec: ``SOURCE:NAME``; a bare name is a timm name (see :func:`parse_spec`).
        checkpoint: a local state_dict (or mmengine/``{'state_dict': ...}``) file loaded strictly,
            ``weights_only=True``; the message names the file and the first mismatching keys.
        **kwargs: passed to the library's constructor (``num_classes=5``, ``img_size=64``...).

    Example:
        >>> build_model("timm:resnet18", num_classes=5).fc.out_features
        5
    """
    parsed = parse_spec(spec)
    builders = {"timm": _timm, "torchvision": _torchvision, "mmaction": _mmaction}
    model = builders[parsed.source](parsed.name, kwargs)
    if checkpoint:
        # MMAction2 stock and paper-repo TSM checkpoints (the paper's online MobileNetV2 too) are imported.
        adapt = layout_adapter(model, "--checkpoint", log=_note)
        load_state_dict_file(checkpoint, model, source="--checkpoint", adapt=adapt)
    return model


def default_frame_size(model: nn.Module) -> int:
    """The model's own input side (timm's ``pretrained_cfg``), else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])

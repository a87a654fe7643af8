"""Builds image models from short specs: ``timm:NAME``, ``torchvision:NAME`` or a bare name.

Weights are never downloaded: models are randomly initialised unless a local checkpoint is
loaded by the caller.
"""

from typing import Any

from torch import nn

__all__ = ["build_model"]


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Creates a model from ``timm:resnet18``, ``torchvision:mobilenet_v2`` or a bare timm name.

    Example:
        >>> build_model("timm:resnet18", num_classes=5).fc.out_features
        5
    """
    source, _, name = spec.rpartition(":")
    source = source or "timm"
    if source == "timm":
        import timm

        if name not in timm.list_models():
            close = timm.list_models(f"*{name}*")[:5]
            raise ValueError(f"timm has no model {name!r}. Close names: {close or 'none'}; "
                             "`python -c 'import timm; print(timm.list_models())'` lists them all.")
        return timm.create_model(name, pretrained=False, **kwargs)
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except ValueError as err:
            raise ValueError(f"torchvision has no model {name!r} ({err}). "
                             "torchvision.models.list_models() lists them.") from None
    raise ValueError(f"unknown model source {source!r} in {spec!r}: use timm:NAME or torchvision:NAME.")

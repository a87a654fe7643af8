"""Norm layers: how to recognise one, and how to give a fresh model norms that carry signal.

Shared by the coverage sweep, the benchmark, the optimizer constructor and the tests, so that
"a norm" means the same thing everywhere.

Example:
    >>> import torch, torchvision
    >>> model = randomize_norms(torchvision.models.resnet18())
    >>> is_norm(model.bn1), bool((model.bn1.weight.detach() >= 0.5).all())
    (True, True)
"""

import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NORM_TYPES", "is_norm", "randomize_norms"]

NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)

# timm's own norms (LayerNorm2d, RmsNorm, BatchNormAct2d, FrozenBatchNorm2d, EvoNorm2dS0) do not
# all subclass torch's; their class names say what they are.
_NORM_NAME = re.compile(r"Norm(Act)?(\d+d)?$|^EvoNorm")

# Parameters that scale a whole residual branch (layer scale, skip-init gains); timm
# zero-initialises or shrinks several of them.
_SCALE_NAMES = ("gamma", "scale", "skipinit_gain", "layer_scale", "ls")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (torch's, timm's or any ``*Norm`` class)."""
    if isinstance(module, NORM_TYPES):
        return True
    return any(_NORM_NAME.search(cls.__name__) for cls in type(module).__mro__ if cls not in (nn.Module, object))


def _uniform(tensor: torch.Tensor, low: float, high: float, generator: torch.Generator | None) -> None:
    tensor.uniform_(low, high, generator=generator)


def _randomize_norm(module: nn.Module, generator: torch.Generator | None) -> None:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        _uniform(weight, 0.5, 1.5, generator)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point():
        _uniform(bias, -0.2, 0.2, generator)
    if isinstance(getattr(module, "running_var", None), torch.Tensor):
        _uniform(module.running_mean, -0.1, 0.1, generator)
        _uniform(module.running_var, 0.5, 1.5, generator)


def randomize_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random affine weights and statistics for every norm layer and branch scale; returns ``model``.

    timm zero-initialises the last norm (or the layer scale) of many residual branches, so a
    fresh model's branches output (nearly) zeros and a shift inside them would change nothing.
    Zero-initialised matrices (heads, gates) get small random values for the same reason.

    Args:
        model: changed in place.
        generator: optional ``torch.Generator`` for reproducible values.
    """
    with torch.no_grad():
        for module in model.modules():
            if is_norm(module):
                _randomize_norm(module, generator)
            for name, param in module.named_parameters(recurse=False):
                if param.dim() >= 2 and not bool(param.any()):
                    param.normal_(0.0, 0.05, generator=generator)
                if name.startswith(_SCALE_NAMES):
                    _uniform(param, 0.5, 1.5, generator)
    return model

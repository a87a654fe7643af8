"""Models by name and what the project needs to know about their layers.

* :mod:`.specs`: the one model-spec parser and builder (``timm:NAME``, ``torchvision:NAME``,
  ``mmaction:resnetNN``), used by every verb and study;
* :mod:`.norms`: what a norm layer is and how to give norms random statistics.
"""

from .norms import is_norm, randomize_norms
from .specs import SOURCES, Spec, build_model, default_frame_size, parse_spec

__all__ = ["Spec", "parse_spec", "build_model", "default_frame_size", "SOURCES", "is_norm", "randomize_norms"]

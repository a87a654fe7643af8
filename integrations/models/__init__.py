"""Models by name and what the project needs to know about their layers.

* :mod:`.specs`: the one model-spec parser and builder (``timm:NAME``, ``torchvision:NAME``,
  ``mmaction:resnetNN``), used by every verb and study;
* :mod:`.norms`: what a norm layer is and how to give norms random statistics.
"""

from .norms import is_norm, randomize_norms
from .specs import SOURCES, build_model, default_frame_size

__all__ = ["build_model", "default_frame_size", "SOURCES", "is_norm", "randomize_norms"]

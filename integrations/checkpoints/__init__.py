"""Checkpoints: safe loading, the anchors' layouts and their import.

* :mod:`.loading`: the one weights-only reader and strict state-dict matching;
* :mod:`.layouts`: MMAction2's and the paper repository's TSM key layouts, detected from keys;
* :mod:`.importing`: those layouts converted to this project's keys (``import-checkpoint``).
"""

from .importing import *  # noqa: F403
from .importing import __all__  # noqa: F401

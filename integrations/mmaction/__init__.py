"""MMAction2 adapter: the ``TSMSurgeryBackbone`` plugin, the stock TSM types' equivalents
(``STOCK_EQUIVALENTS``), its hook, optimizer constructor, runner.

Name it in a config to register everything::

    custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

Importing it first applies :mod:`.compat` (patches that make mmaction2 1.2.0 work on this stack).
"""

from . import compat

compat.apply()

from .backbone import TSMSurgeryBackbone  # noqa: E402
from .checkpoint import load_weights, trusted_resume  # noqa: E402
from .clip_length import ClipLengthHook, frames_per_clip, sync_clip_length  # noqa: E402
from .optim import TSMSurgeryOptimWrapperConstructor  # noqa: E402
from .stock import STOCK_EQUIVALENTS, TSMSurgeryMobileNetV2, TSMSurgeryMobileOne, TSMSurgeryResNet  # noqa: E402

__all__ = [
    "TSMSurgeryBackbone",
    "TSMSurgeryResNet",
    "TSMSurgeryMobileNetV2",
    "TSMSurgeryMobileOne",
    "STOCK_EQUIVALENTS",
    "ClipLengthHook",
    "TSMSurgeryOptimWrapperConstructor",
    "sync_clip_length",
    "frames_per_clip",
    "load_weights",
    "trusted_resume",
]

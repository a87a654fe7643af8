"""Makes mmaction2 1.2.0 importable and usable on this stack; applied once on import.

Each patch has a one-line reason. (Minimal version: more patches land with the plugin.)
"""

import sys
import types

_applied = False


def _placeholder_drn() -> None:
    # The 1.2.0 wheel lacks mmaction/models/localizers/drn/ (upstream issue #2714), so
    # `import mmaction.models` fails; DRN is a temporal-grounding localizer we never use.
    if "mmaction.models.localizers.drn.drn" in sys.modules:
        return
    package = types.ModuleType("mmaction.models.localizers.drn")
    package.__path__ = []
    module = types.ModuleType("mmaction.models.localizers.drn.drn")

    class DRN:  # noqa: D401 - stands in for the missing class
        """Placeholder for the DRN localizer missing from the mmaction2 1.2.0 wheel."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("DRN is missing from the mmaction2 1.2.0 wheel (upstream #2714).")

    module.DRN = DRN
    package.drn = module
    sys.modules[package.__name__] = package
    sys.modules[module.__name__] = module


def apply() -> None:
    """Applies every patch once; safe to call repeatedly."""
    global _applied
    if _applied:
        return
    _placeholder_drn()
    _applied = True

"""Checkpoint loading: weights with ``weights_only=True``, full state only for trusted files.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine's checkpoints hold its
message hub (``HistoryBuffer`` objects with numpy arrays and references to the buffer's own
methods), so ``load_from`` fails on them. Turning the check off lets a checkpoint run any code
while it loads. Instead, :func:`load_weights` keeps ``weights_only=True`` and allows exactly
the few globals an mmengine checkpoint needs (numpy arrays, ``HistoryBuffer`` and its
statistics methods). Anything else stops with an error that names the file and the global.

Resuming full training state from a checkpoint that needs more than that (a custom scheduler
or hook object pickled inside it) is an explicit opt-in for files you trust:
``tsm-surgery train CONFIG --resume`` (or ``train(..., resume=True)``), the config key
``trusted_resume = True``, or the environment variable ``TSM_SURGERY_TRUSTED_RESUME=1``.
Even then the safe loader is tried first; the full unpickler is only the fallback.
"""

import contextlib
import os
import pickle
import threading
from typing import Any, Iterator, Optional

import numpy as np
import torch

__all__ = ["load_weights", "load_checkpoint_file", "trusted_resume", "is_trusted", "TRUST_ENV",
           "CheckpointLoadError"]

TRUST_ENV = "TSM_SURGERY_TRUSTED_RESUME"
_state = threading.local()


class CheckpointLoadError(pickle.UnpicklingError):
    """A checkpoint holds objects that ``weights_only=True`` does not load."""


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    # mmengine pickles HistoryBuffer.statistics_methods as getattr(HistoryBuffer, 'min'), ...
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and not name.startswith("_") and callable(HistoryBuffer.__dict__.get(name)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed while loading weights.")


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    allowed = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    # numpy 2 pickles dtypes through their classes (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    # Pickles written under numpy 1 name numpy.core.*, under numpy 2 numpy._core.*.
    named = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        named.append((core.multiarray._reconstruct, f"{module}._reconstruct"))
        named.append((core.multiarray.scalar, f"{module}.scalar"))
    return allowed + named


def _safe_globals() -> list:
    from mmengine.logging import HistoryBuffer

    return _numpy_globals() + [HistoryBuffer, (_history_buffer_getattr, "builtins.getattr")]


def load_weights(path: str, map_location: Any = "cpu") -> Any:
    """Loads a checkpoint with ``weights_only=True`` plus mmengine's own checkpoint types.

    Args:
        path: a local checkpoint file.
        map_location: as for ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointLoadError: the file holds other Python objects; the message names one and
            says how to opt in for a trusted file.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointLoadError(
            f"checkpoint {path!r} holds Python objects beyond weights, so it was not loaded with "
            f"weights_only=True ({str(err).splitlines()[0]}). Weights from it cannot be loaded safely. "
            f"If you trust the file, resume from it with `tsm-surgery train CONFIG --resume` "
            f"(config key trusted_resume=True, or {TRUST_ENV}=1).") from err


def is_trusted() -> bool:
    """Whether full unpickling is allowed right now (inside :func:`trusted_resume` or by env)."""
    return bool(getattr(_state, "trusted", False)) or os.environ.get(TRUST_ENV, "") == "1"


@contextlib.contextmanager
def trusted_resume(enabled: bool = True) -> Iterator[None]:
    """Within this block, a checkpoint the safe loader rejects is unpickled in full."""
    previous = getattr(_state, "trusted", False)
    _state.trusted = bool(enabled) or previous
    try:
        yield
    finally:
        _state.trusted = previous


def load_checkpoint_file(path: str, map_location: Optional[Any] = None) -> Any:
    """mmengine's loader for local files: safe first, full unpickling only when trusted."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (check load_from, the CHECKPOINT "
                                "argument or the work dir's last_checkpoint).")
    try:
        return load_weights(path, map_location)
    except CheckpointLoadError:
        if not is_trusted():
            raise
    from mmengine.logging import print_log

    print_log(f"{path}: loading the full pickle (trusted resume opt-in).", logger="current")
    return torch.load(path, map_location=map_location, weights_only=False)

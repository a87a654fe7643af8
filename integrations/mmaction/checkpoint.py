"""mmengine's checkpoint loading, routed through :mod:`tsm_surgery.integrations.checkpoints.loading`.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine's checkpoints hold its
message hub, so ``load_from`` fails on them. Turning the check off lets a checkpoint run any
code while it loads. Instead every local file mmengine loads (``load_from``, ``test``'s
CHECKPOINT, ``resume``) goes through :func:`load_checkpoint_file`, which reads it with
:func:`~tsm_surgery.integrations.checkpoints.loading.read_checkpoint`: ``weights_only=True`` plus
exactly the globals an mmengine checkpoint needs.

Full unpickling is an opt-in for exactly one file, the checkpoint being resumed: inside
:func:`trusted_resume` ``(path)``, that path (and no other) may be unpickled in full when the
safe loader refuses it, with a WARNING naming it. ``tsm-surgery train --resume`` (the config
key ``trusted_resume=True``, or ``TSM_SURGERY_TRUSTED_RESUME=1``) opts in for the checkpoint
``Runner.resume`` is given; ``test`` and ``load_from`` never resume, so no opt-in reaches them.
"""

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from tsm_surgery.integrations.checkpoints.loading import CheckpointLoadError, read_checkpoint

__all__ = ["load_weights", "load_checkpoint_file", "trusted_resume", "is_trusted", "TRUST_ENV",
           "CheckpointLoadError"]

TRUST_ENV = "TSM_SURGERY_TRUSTED_RESUME"
_state = threading.local()


def load_weights(path: str, map_location: Any = "cpu") -> Any:
    """Reads a checkpoint with ``weights_only=True`` plus mmengine's own checkpoint types.

    Same as :func:`~tsm_surgery.integrations.checkpoints.loading.read_checkpoint`.
    """
    return read_checkpoint(path, map_location=map_location)


def _key(path: str) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def is_trusted(path: str) -> bool:
    """Whether ``path`` is the one file the current :func:`trusted_resume` block allows."""
    trusted = getattr(_state, "path", None)
    return trusted is not None and trusted == _key(path)


@contextlib.contextmanager
def trusted_resume(path: str | None) -> Iterator[None]:
    """Within this block, ``path`` (only) may be unpickled in full if the safe loader refuses it.

    ``None`` allows nothing. Blocks do not add up: the innermost names the one trusted file.
    """
    previous = getattr(_state, "path", None)
    _state.path = None if path is None else _key(path)
    try:
        yield
    finally:
        _state.path = previous


def load_checkpoint_file(path: str, map_location: Any | None = None) -> Any:
    """mmengine's loader for local files: safe first, full unpickling only for the trusted file."""
    try:
        return read_checkpoint(path, map_location=map_location)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} Check load_from, the CHECKPOINT argument, --resume PATH or the path in the "
                                "work dir's last_checkpoint file.") from None
    except CheckpointLoadError as err:
        if err.refused_global is None or not is_trusted(path):
            raise
        refused = err.refused_global
    from mmengine.logging import print_log

    print_log(f"{path}: unpickling this checkpoint in full (it holds {refused} and more than "
              "weights; it can run code): trusted-resume opt-in for this file only.", logger="current",
              level=logging.WARNING)
    return torch.load(os.path.expanduser(path), map_location=map_location, weights_only=False)

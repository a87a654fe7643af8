"""Exact resume: every random state of a training run is saved with each checkpoint and restored on resume.

mmengine's resume restores the model, optimizer, schedulers and message hub, then re-seeds every
generator with the run's seed, so the epochs after a resume draw other frame offsets, other
augmentations and other dropout masks than the uninterrupted run. :class:`RandomStateHook` puts
the generators' states (python ``random``, numpy's global generator, torch's CPU generator and every
CUDA device's) into each checkpoint's ``meta`` and sets them back when the run resumes, just before
training continues. Validation runs between a checkpoint and the next epoch; its draws (the
dataloader's base seed) are undone so that the uninterrupted run continues from the saved state too.

The rest is already a function of the seed and the epoch: ``DefaultSampler`` shuffles with
``seed + epoch`` and mmengine seeds each non-persistent dataloader worker with ``seed + worker_id``
(+ the rank), and the base seed torch hands the workers is drawn from the restored torch generator.
What stays outside (persistent workers' generators, GPU kernels that are not deterministic) is
described in docs/reliability.md.
"""

import random
from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook

__all__ = ["RandomStateHook", "capture", "restore", "META_KEY"]

META_KEY = "random_states"


def capture() -> dict[str, Any]:
    """The current states of python's, numpy's and torch's (CPU and CUDA) global generators."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore(states: dict[str, Any]) -> None:
    """Sets the generators back to ``states`` (from :func:`capture`)."""
    random.setstate(_as_python_state(states["python"]))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_python_state(state: Any) -> tuple:
    version, internal, gauss = state  # a checkpoint may hold the tuples as lists
    return version, tuple(internal), gauss


class RandomStateHook(Hook):
    """Saves the random states with every checkpoint, restores them on resume, keeps validation neutral."""

    priority = "VERY_HIGH"

    def __init__(self) -> None:
        self._resumed: dict[str, Any] | None = None
        self._before_val: dict[str, Any] | None = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})[META_KEY] = capture()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._resumed = (checkpoint.get("meta") or {}).get(META_KEY)

    def before_train(self, runner) -> None:
        # Runner.resume re-seeds every generator after loading; the saved states win when resuming
        # (a resumed run is past iteration 0; load_from's weights start at 0 and keep the fresh seed).
        if self._resumed is not None and runner.iter > 0:
            restore(self._resumed)
        self._resumed = None

    def before_val(self, runner) -> None:
        self._before_val = capture()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            restore(self._before_val)
            self._before_val = None

"""The one checkpoint loader: ``weights_only=True``, strict keys, one message.

Every path that loads weights goes through here: ``stream``, ``export`` and ``convert``
(:func:`load_state_dict_file`), ``test``/``load_from`` (mmengine's loader is routed to
:func:`read_checkpoint` and its keys checked with :func:`match_state_dict`) and
``TSMSurgeryBackbone(pretrained=...)``.

* :func:`read_checkpoint` unpickles with ``weights_only=True`` and allows exactly the few
  extra globals a checkpoint written by mmengine (``tsm-surgery train``) holds: numpy arrays
  and the message hub's ``HistoryBuffer``. Anything else stops with a
  :class:`CheckpointLoadError` that names the file and the refused global. A missing, empty,
  truncated or non-checkpoint file gets the same error type with the file named.
* :func:`state_dict_of` finds the state_dict in what was read (a plain one, or under
  ``state_dict``/``model``) and strips a DataParallel ``module.`` prefix.
* :func:`match_state_dict` compares it with the model's and raises
  :class:`CheckpointMismatchError` naming the file and the first mismatching keys.

Key-layout adapters (e.g. a checkpoint saved with another library's key names) plug in as
``adapt=``: a callable ``adapt(state, model_state) -> state`` that :func:`match_state_dict`
applies before comparing keys, so every loader above accepts the same adapted layouts.

Example:
    >>> model = torch.nn.Linear(3, 2)
    >>> torch.save({"state_dict": model.state_dict()}, "/tmp/lin.pth")
    >>> load_state_dict_file("/tmp/lin.pth", torch.nn.Linear(3, 2))  # doctest: +ELLIPSIS
    Linear(...)
"""

import importlib.util
import logging
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["read_checkpoint", "state_dict_of", "match_state_dict", "load_state_dict_file", "CheckpointLoadError",
           "CheckpointMismatchError", "Adapter", "cli_log"]

# adapt(checkpoint state_dict, model state_dict) -> checkpoint state_dict in the model's layout
Adapter = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


class CheckpointLoadError(pickle.UnpicklingError, ValueError):
    """A checkpoint file cannot be read with ``weights_only=True``.

    Attributes:
        path: the file.
        refused_global: the global ``weights_only=True`` refused (e.g. ``'posix.system'``), or
            ``None`` when the file is not a readable checkpoint at all.
    """

    def __init__(self, message: str, path: str = "", refused_global: str | None = None):
        super().__init__(message)
        self.path = path
        self.refused_global = refused_global


class CheckpointMismatchError(KeyError, ValueError):
    """A checkpoint's keys or shapes do not match the model's."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    # mmengine pickles HistoryBuffer.statistics_methods as getattr(HistoryBuffer, 'min'), ...
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and not name.startswith("_") and callable(HistoryBuffer.__dict__.get(name)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed while loading weights.")


def _numpy_globals() -> list:
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    allowed = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    # numpy 2 pickles dtypes through their classes (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    # Pickles written under numpy 1 name numpy.core.*, under numpy 2 numpy._core.*.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((core.multiarray._reconstruct, f"{module}._reconstruct"))
        allowed.append((core.multiarray.scalar, f"{module}.scalar"))
    return allowed


def _mmengine_globals() -> list:
    from mmengine.logging import HistoryBuffer

    return [HistoryBuffer, (_history_buffer_getattr, "builtins.getattr")]


def _refused_global(err: BaseException) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def _needs_mmengine(name: str | None) -> bool:
    return bool(name) and (name.startswith("mmengine.") or name == "builtins.getattr")


def _load(path: str, map_location: Any, allowed: list) -> Any:
    with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
        # The weights-only unpickler warns about any pickle protocol but 2: not the user's concern.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location=map_location, weights_only=True)


# torch's own advice (re-run with weights_only=False) is what this module exists to avoid.
_TORCH_ADVICE = ("Weights only load failed", "In PyTorch 2.6", "Re-running", "Please file an issue",
                 "Check the documentation", "WeightsUnpickler error")


def _reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_TORCH_ADVICE)] or lines
    first = lines[0].split(". ")[0].rstrip(".") if lines else repr(err)
    return f"{type(err).__name__}: {first}"


def _looks_like_checkpoint(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"  # torch.save's zip archive, or a pickle (protocol >= 2)


def read_checkpoint(path: str, *, source: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """Reads a checkpoint with ``weights_only=True`` (plus numpy arrays and mmengine's message hub).

    Args:
        path: a local file.
        source: how the user named it, for messages (``'--checkpoint'``, ``'load_from'``...).
        map_location: as for ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointLoadError: the file is empty, truncated or not a checkpoint, or holds Python
            objects beyond weights (``refused_global`` names the first one).
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}={path!r} does not exist or is not a file.")
    if os.path.getsize(path) == 0:
        raise CheckpointLoadError(f"{source}={path!r} is empty (0 bytes): not a checkpoint. Was it copied "
                                  "or saved completely?", path)
    if not _looks_like_checkpoint(path):
        with open(path, "rb") as f:
            head = f.read(12)
        raise CheckpointLoadError(f"{source}={path!r} is not a PyTorch checkpoint: it is neither a torch.save zip "
                                  f"archive nor a pickle (it starts with {head!r}). Is it the right file?", path)
    allowed = _numpy_globals()
    try:
        try:
            return _load(path, map_location, allowed)
        except pickle.UnpicklingError as err:
            if not (_needs_mmengine(_refused_global(err)) and importlib.util.find_spec("mmengine")):
                raise
            return _load(path, map_location, allowed + _mmengine_globals())
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name is None:
            raise _not_a_checkpoint(path, source, err) from err
        hint = " Install mmengine to read checkpoints written by it." if _needs_mmengine(name) else ""
        raise CheckpointLoadError(
            f"{source}={path!r} holds Python objects beyond weights (weights_only=True refused the global "
            f"{name}), so it was not loaded: unpickling it could run code.{hint} Never unpickle a file you did "
            "not write yourself; checkpoints written by `tsm-surgery train` hold weights only and load as they are.",
            path, refused_global=name) from err
    except Exception as err:  # torch.load's errors for files that are no checkpoint vary widely
        raise _not_a_checkpoint(path, source, err) from err


def _not_a_checkpoint(path: str, source: str, err: BaseException) -> CheckpointLoadError:
    return CheckpointLoadError(
        f"{source}={path!r} is not a readable PyTorch checkpoint ({_reason(err)}). It may be truncated or "
        "another kind of file; checkpoints are written by torch.save.", path)


def state_dict_of(checkpoint: Any, path: str = "", source: str = "checkpoint",
                  prefix: str | None = None) -> dict[str, Any]:
    """The state_dict inside what :func:`read_checkpoint` returned.

    Uses a ``state_dict`` or ``model`` entry when present, strips a ``module.`` prefix
    (DataParallel) and, with ``prefix``, keeps only the keys under it (prefix removed).

    Raises:
        CheckpointLoadError: it holds no dict of tensors.
    """
    state = checkpoint
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        what = f"a {type(state).__name__}" if not isinstance(state, Mapping) else "a dict without tensors"
        raise CheckpointLoadError(f"{source}={path!r} holds {what}, not a state_dict (a dict of tensors, "
                                  "plain or under 'state_dict'/'model').", path)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _mismatch_hint(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    if unexpected and any(".net." in k for k in unexpected):
        return (" Keys with '.net.' come from a TSM backbone's shift wrappers (MMAction2 or the paper's code), in "
                "a layout not recognised here: `tsm-surgery import-checkpoint SRC OUT` names what it detects.")
    if unexpected and all(k.startswith(("backbone.", "cls_head.", "data_preprocessor.")) for k in unexpected):
        return (" It is an MMAction2 recognizer checkpoint (keys 'backbone.'/'cls_head.'): pass it with the "
                "config it was trained with (--config CONFIG --checkpoint FILE).")
    if shapes and not missing and not unexpected:
        return " Only shapes differ: pass the classifier size it was trained with (--num-classes) and the same model."
    return " Check that the model (or config) is the one the checkpoint was trained with."


def match_state_dict(state: dict[str, Any], model_state: dict[str, Any], *, path: str = "",
                     source: str = "checkpoint", required: Callable[[str], bool] | None = None,
                     allow_unexpected: bool = False, adapt: Adapter | None = None,
                     hint: str = "") -> dict[str, Any]:
    """Checks a checkpoint's state_dict against the model's; returns it (adapted) if it fits.

    Args:
        state: the checkpoint's state_dict (see :func:`state_dict_of`).
        model_state: ``model.state_dict()``.
        path, source: name the file in the message.
        required: which model keys must be present with equal shapes (default: all of them).
        allow_unexpected: accept checkpoint keys the model lacks.
        adapt: a key-layout adapter applied first, ``adapt(state, model_state) -> state``.
        hint: the caller's advice, in place of the generic hint.

    Raises:
        CheckpointMismatchError: names the file, the counts and the first mismatching keys.
    """
    if adapt is not None:
        state = adapt(state, model_state)
    need = [k for k in model_state if required is None or required(k)]
    missing = [k for k in need if k not in state]
    unexpected = [] if allow_unexpected else [k for k in state if k not in model_state]
    shapes = [k for k in need if k in state and hasattr(state[k], "shape") and hasattr(model_state[k], "shape")
              and tuple(state[k].shape) != tuple(model_state[k].shape)]
    if not (missing or unexpected or shapes):
        return state
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(model_state)} model keys are missing (first: {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint keys are unknown to the model (first: {unexpected[:3]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} have other shapes (first: {k}: checkpoint {tuple(state[k].shape)} vs model "
                     f"{tuple(model_state[k].shape)})")
    raise CheckpointMismatchError(f"{source}={path!r} does not match the model: {'; '.join(parts)}."
                                  f"{' ' + hint if hint else _mismatch_hint(missing, unexpected, shapes)}")


def load_state_dict_file(path: str, model: nn.Module, *, source: str = "checkpoint", prefix: str | None = None,
                         adapt: Adapter | None = None) -> nn.Module:
    """Loads a checkpoint file into ``model`` strictly, weights only; returns ``model``.

    Args:
        path: a ``torch.save`` file: a state_dict, or a dict with one under ``state_dict``/``model``
            (an mmengine checkpoint from ``tsm-surgery train`` included).
        model: its keys and shapes must match exactly (after ``prefix`` and ``adapt``).
        source: how the user named the file, for messages.
        prefix: keep only the keys under this prefix, removing it (e.g. ``'backbone.'``).
        adapt: a key-layout adapter, see :func:`match_state_dict`.

    Raises:
        FileNotFoundError, CheckpointLoadError: see :func:`read_checkpoint`.
        CheckpointMismatchError: keys or shapes differ; nothing was loaded.
    """
    state = state_dict_of(read_checkpoint(path, source=source), path, source, prefix)
    state = match_state_dict(state, model.state_dict(), path=path, source=source, adapt=adapt)
    model.load_state_dict(state, strict=True)
    return model


def cli_log(level: int, message: str) -> None:
    """The ``log(level, message)`` of the verbs: one line on stderr, ``warning:`` or ``note:``."""
    print(f"{'warning' if level >= logging.WARNING else 'note'}: {message}", file=sys.stderr)

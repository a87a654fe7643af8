"""Saved-tensor recompute: tensors saved for backward that are cheap functions of a live tensor
are stored as a recipe and rebuilt in the backward pass.

A temporal shift's output is saved by its consumer (a conv saves its input for the weight
gradient), which would keep one extra activation per site alive until the backward pass. The
shift's input is alive anyway (it is the shortcut), so inside :func:`recompute_shifts` the op
tags its output with :func:`mark_recomputable` and the saved-tensor hooks store how to rebuild
it instead of the tensor itself. This module knows nothing about the shift: it rebuilds any
tagged tensor by calling the function it was tagged with.

A converted network pays for this only at its shift sites: its forward turns tagging on
(:func:`install_recompute_scope`), and its train graph opens the hooks right before each
consumer of a shift output and closes them right after (:func:`open_site_hooks`,
:func:`close_site_hooks`), so only what those consumers save goes through Python (a conv: its
input and its weight). :func:`recompute_shifts` is the whole-forward form for hand-written
models.
"""

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["recompute_shifts", "install_recompute_scope", "mark_recomputable", "in_graph_capture", "open_site_hooks",
           "close_site_hooks"]

_TAG = "_tsm_shift_of"


def in_graph_capture() -> bool:
    """True while the code is scripted, traced, exported or compiled (no eager tensors to tag).

    Every ONNX exporter runs the model under one of these (the TorchScript-based one under the
    JIT tracer, the dynamo-based one under ``torch.export``), so ``torch.onnx.is_in_onnx_export``,
    which imports two modules on each call, is not asked: this runs at every site and join of a
    forward.
    """
    if torch.jit.is_scripting():
        return True
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class _Recompute(threading.local):
    depth = 0  # open scopes in which shift outputs are tagged

    def __init__(self):
        self.site_hooks: list[contextlib.AbstractContextManager] = []  # opened by open_site_hooks, not yet closed


_RECOMPUTE = _Recompute()


def recording() -> bool:
    """True inside an active :func:`recompute_shifts` scope of this thread."""
    return _RECOMPUTE.depth > 0


def mark_recomputable(out: Tensor, source: Tensor, fn: Callable[..., Tensor], *args) -> None:
    """Records that ``out == fn(source, *args)``, so a saved ``out`` can be rebuilt from ``source``.

    Only a weak reference to ``source`` and both version counters are kept: an ``out`` changed
    in place before it is saved is saved as it is, and if ``source`` changes in place before
    the backward pass, the rebuild refuses rather than give another tensor.
    """
    setattr(out, _TAG, (weakref.ref(source), source._version, fn, args, out._version))


class _Recipe:
    """What a saved tagged tensor becomes: its source, the source's version and how to rebuild it."""

    __slots__ = ("args", "fn", "source", "version")

    def __init__(self, source: Tensor, version: int, fn: Callable[..., Tensor], args):
        self.source, self.version, self.fn, self.args = source, version, fn, args

    def rebuild(self) -> Tensor:
        if self.source._version != self.version:
            raise RuntimeError(
                "the input of a temporal shift was modified in place after the shift ran, so its "
                "output cannot be recomputed for the backward pass. Hint: avoid the in-place op on "
                "the block input, or run the model without the recompute scope "
                "(net.recompute_shifts = False)."
            )
        with torch.no_grad():
            return self.fn(self.source.detach(), *self.args)


class _Saved:
    """A saved tensor and its version: the hooks replace autograd's own check that it is unchanged."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: Tensor):
        # detach: the saved object must not hold this tensor's graph (a reference cycle for
        # outputs); the detached tensor shares the version counter, so later writes still show.
        self.tensor, self.version = t.detach(), t._version

    def get(self) -> Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a tensor of shape {list(self.tensor.shape)} is at version {self.tensor._version}; "
                f"expected version {self.version} instead (found by tsm_surgery's recompute scope)."
            )
        return self.tensor


def _pack(t: Tensor):
    tag = getattr(t, _TAG, None)
    if tag is not None and t._version == tag[4]:  # a changed output is no longer fn(source)
        source = tag[0]()
        if source is not None:
            return _Recipe(source, *tag[1:4])
    return _Saved(t)


def _unpack(packed) -> Tensor:
    return packed.rebuild() if isinstance(packed, _Recipe) else packed.get()


@contextlib.contextmanager
def recompute_shifts() -> Iterator[None]:
    """Within this scope, tensors saved for backward that are shift outputs are recomputed.

    In this scope a shift's consumer saves the shift's input instead of its output, and the
    backward pass rebuilds the shift, a copy, when it needs it. Other saved tensors are
    unchanged.

    The scope does nothing when saved-tensor hooks are already active (activation
    checkpointing or offloading of the caller's own), under ``torch.compile`` (whose
    partitioner makes the same save-or-recompute choice itself) and when tracing.

    Example:
        >>> from tsm_surgery import temporal_shift
        >>> net = torch.nn.Conv2d(16, 16, 1)
        >>> x = torch.randn(8, 16, 4, 4, requires_grad=True)
        >>> with recompute_shifts():
        ...     net(temporal_shift(x, n_segments=8)).sum().backward()
    """
    if (in_graph_capture() or not torch.is_grad_enabled()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
        yield
        return
    _RECOMPUTE.depth += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _RECOMPUTE.depth -= 1


def _hooks_taken() -> bool:
    """True when saved-tensor hooks are active already (the caller's checkpointing or offloading)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def open_site_hooks() -> bool:
    """Opens the saved-tensor hooks for one consumer of a shift output; True when it did.

    A converted network's train graph calls this right before each consumer of a shift output
    and :func:`close_site_hooks` right after it, so only the tensors that consumer saves go
    through Python. It does nothing outside a forward that tags shift outputs, under
    ``torch.compile`` and when other saved-tensor hooks are active.
    """
    if _RECOMPUTE.depth == 0 or torch.compiler.is_compiling() or _hooks_taken():
        return False
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
    hooks.__enter__()
    _RECOMPUTE.site_hooks.append(hooks)
    return True


def close_site_hooks(opened: bool) -> None:
    """Closes what the matching :func:`open_site_hooks` opened."""
    if opened and _RECOMPUTE.site_hooks:
        _RECOMPUTE.site_hooks.pop().__exit__(None, None, None)


class _OpenScopes(threading.local):
    def __init__(self):
        # per module: for each forward running, the number of site hooks open when it began,
        # or None when that forward does not tag (recompute off, no grad, caller's hooks)
        self.by_module: dict[int, list[int | None]] = {}


# Saved-tensor hooks live on a per-thread stack, so the scopes a module's forward opened are
# kept per thread too: a module called from two threads closes each thread's own scope.
_OPEN_SCOPES = _OpenScopes()


def _scope_enter(module: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        return
    tags = (getattr(module, "recompute_shifts", True) and torch.is_grad_enabled() and not in_graph_capture()
            and not _hooks_taken())
    _OPEN_SCOPES.by_module.setdefault(id(module), []).append(len(_RECOMPUTE.site_hooks) if tags else None)
    if tags:
        _RECOMPUTE.depth += 1


def _scope_exit(module: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling():
        return
    scopes = _OPEN_SCOPES.by_module.get(id(module))
    if not scopes:
        return
    opened_before = scopes.pop()
    if not scopes:
        del _OPEN_SCOPES.by_module[id(module)]
    if opened_before is None:
        return
    _RECOMPUTE.depth -= 1
    while len(_RECOMPUTE.site_hooks) > opened_before:  # left open by a consumer that raised
        _RECOMPUTE.site_hooks.pop().__exit__(None, None, None)


def install_recompute_scope(module: nn.Module) -> nn.Module:
    """Tags the shift outputs of every forward of ``module`` (``convert`` does this).

    The hooks that store the tagged tensors as recipes are opened by the graph around each
    shift output's consumer (:func:`open_site_hooks`). Set ``module.recompute_shifts = False``
    to keep the shift outputs saved instead.
    """
    module.register_forward_pre_hook(_scope_enter)
    module.register_forward_hook(_scope_exit, always_call=True)
    return module

"""Symbolic tracing with a small registry of what must not be traced through.

A module is a *leaf* when its forward cannot be traced symbolically (data-dependent control
flow, calls into C extensions) or must stay one node; a *notrace function* is recorded as one
call instead of being traced into. Each registry entry carries its reason. timm keeps its own
registry for its layers; when timm is already imported, the tracer uses it too (it never
imports timm itself).
"""

import functools
import inspect
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import fx, nn

from ._shift import TemporalShift

__all__ = ["register_leaf_module", "register_notrace_function", "leaf_modules", "notrace_functions", "TraceError"]

LeafSpec = type[nn.Module] | str

_LEAF_MODULES: dict[LeafSpec, str] = {}
_NOTRACE_FUNCTIONS: dict[Callable, str] = {}


def register_leaf_module(module: LeafSpec, reason: str) -> LeafSpec:
    """Keeps a module class (or a module path such as ``"backbone.stem"``) as one graph node.

    Args:
        module: an ``nn.Module`` subclass, or the dotted path of one submodule.
        reason: why it cannot or should not be traced through; shown by :func:`leaf_modules`.

    Returns:
        ``module``, so the call can decorate a class definition.

    Example:
        >>> class Lookup(nn.Module):
        ...     def forward(self, x):
        ...         return x[: int(x.sum() > 0)]
        >>> _ = register_leaf_module(Lookup, "slices by a value computed from the input")
    """
    if not reason:
        raise ValueError("register_leaf_module needs a reason: say why the module cannot be traced through.")
    _LEAF_MODULES[module] = reason
    return module


def register_notrace_function(fn: Callable, reason: str) -> Callable:
    """Records calls to ``fn`` as one graph node instead of tracing into it.

    ``fn`` must be a module-level function called through its module's globals.
    """
    if not reason:
        raise ValueError("register_notrace_function needs a reason: say why the function cannot be traced.")
    _NOTRACE_FUNCTIONS[fn] = reason
    return fn


def leaf_modules() -> dict[LeafSpec, str]:
    """The registered leaf modules with their reasons (a copy)."""
    return dict(_LEAF_MODULES)


def notrace_functions() -> dict[Callable, str]:
    """The registered notrace functions with their reasons (a copy)."""
    return dict(_NOTRACE_FUNCTIONS)


register_leaf_module(TemporalShift, "the shift itself: one node, so a converted model can be traced again")


def _timm_registries() -> tuple[list[type], list[Callable]]:
    # `import timm` loads timm.layers._fx with timm's layers; read it only if timm is loaded.
    fx_registry = sys.modules.get("timm.layers._fx")
    if fx_registry is None:
        return [], []
    return list(fx_registry.get_notrace_modules()), list(fx_registry.get_notrace_functions())


# Rule: norm layers (and subclasses such as timm's BatchNormAct2d) stay one node. Traced into,
# their `self.training` branch would be frozen into the graph, and running the train graph to
# learn shapes would update the running statistics of the model being converted.
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


MODULE_PATH = "tsm_module_path"  # node.meta key: the module whose forward created the node ("" for the root)


class TraceError(RuntimeError):
    """A module could not be traced symbolically."""


def _reads_only_sizes(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """Whether ``node`` is computed from tensor sizes other than the batch (dim 0) and constants,
    with operators and ``math`` functions only."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")  # a whole shape: only its non-batch items may be read
    if node.op == "call_method" and node.target in ("size", "dim"):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if node.target == "dim" or dim is None:
            return True
        return isinstance(dim, int) and dim % values[cast(fx.Node, node.args[0])].dim() != 0
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target is operator.getitem and source is not None \
            and isinstance(values.get(source), torch.Size):
        index = node.args[1]
        return isinstance(index, int) and source is not None and index % len(values[source]) != 0 \
            and _reads_only_sizes(source, values)
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator", "math"):
        return all(_reads_only_sizes(arg, values) for arg in node.all_input_nodes)
    return False


class SiteTracer(fx.Tracer):
    """An FX tracer that honours the registries and remembers which module it was in.

    With an example input, a branch on a tensor's spatial size (timm's TinyViT:
    ``if H == self.window_size``) is decided on the example and kept as a guard
    (``torch._assert``), so an input whose size would take the other branch fails loudly
    instead of computing something else. Branches on values or on the batch size still fail.
    """

    def __init__(self, extra_leaf_modules: Sequence[LeafSpec] = (), example_input: torch.Tensor | None = None):
        self.example_input = example_input
        self._values: dict[fx.Node, Any] = {}
        self._evaluating = False
        timm_modules, timm_functions = _timm_registries()
        # timm registers whole blocks (NormFreeBlock, TinyVitBlock, MobileVitBlock) for its
        # feature extractor, not only untraceable layers; a leaf block would hide its residual
        # join, so those are traced into and kept whole only when that fails (see trace()).
        self.soft_leaf_types = tuple(timm_modules)
        leaves = list(_LEAF_MODULES) + list(extra_leaf_modules)
        self.leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))
        self.leaf_paths = {leaf for leaf in leaves if isinstance(leaf, str)}
        functions = tuple(_NOTRACE_FUNCTIONS) + tuple(timm_functions)
        super().__init__(autowrap_functions=functions, param_shapes_constant=True)
        self.module_path_stack: list[str] = []
        self.failed_path: str | None = None
        # Each branch decided on the example's size: (the module path holding it, the branch taken).
        self.size_guards: list[tuple[str, bool]] = []

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(module, self.leaf_types) or module_qualified_name in self.leaf_paths:
            return True
        if isinstance(module, _NORM_TYPES):
            # norm subclasses (timm's BatchNormAct2d) read self.training when run: one node serves both graphs
            return True
        return super().is_leaf_module(module, module_qualified_name)

    def _run_node(self, node: fx.Node) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self._values.__getitem__)
        if node.op == "placeholder":  # the input, then the arguments fixed to their defaults
            return self.example_input if not self._values else (args[0] if args else None)
        if node.op == "get_attr":
            return functools.reduce(getattr, str(node.target).split("."), self.root)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        assert callable(node.target)
        return node.target(*args, **kwargs)

    def _value_of(self, target: fx.Node) -> object:
        """``target``'s value on the example input, running the nodes not run before (modules in eval
        mode, so no running statistics change, in either graph)."""
        flags = {m: m.training for m in self.root.modules()}
        self._evaluating = True  # module calls and attributes run eagerly instead of being recorded
        try:
            self.root.eval()
            with torch.no_grad():
                for node in self.graph.nodes:
                    if node not in self._values:
                        self._values[node] = self._run_node(node)
                    if node is target:
                        break
        finally:
            self._evaluating = False
            for module, flag in flags.items():
                module.training = flag
        return self._values[target]

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.example_input is None:
            return super().to_bool(obj)
        try:
            taken = bool(self._value_of(obj.node))
        except Exception:
            return super().to_bool(obj)
        if not _reads_only_sizes(obj.node, self._values):
            return super().to_bool(obj)
        where = self.module_path_stack[-1] if self.module_path_stack else "forward"
        message = (f"'{where}' was traced for inputs of size {tuple(self.example_input.shape[1:])}, and this input "
                   "takes another branch there. Hint: convert again with example_input= of this size.")
        # `== False`, not operator.not_: tracing the generated code again (copies, pickles) must not call bool() on it
        condition = obj if taken else self.create_proxy("call_function", operator.eq, (obj, False), {})
        self.create_proxy("call_function", torch._assert, (condition, message), {})
        self.size_guards.append((self.module_path_stack[-1] if self.module_path_stack else "", taken))
        return taken

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[MODULE_PATH] = self.module_path_stack[-1] if self.module_path_stack else ""
        return node

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, module, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        path = self.path_of_module(module)
        self.module_path_stack.append(path)
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = path
            raise
        finally:
            self.module_path_stack.pop()


def _default_arguments(model: nn.Module) -> dict[str, object]:
    """The forward's parameters after the first that have defaults (masks, flags), fixed to them.

    Rule: the converted network takes one tensor, the frames. Optional extras such as
    ``attn_mask=None`` or ``is_causal=False`` (timm's ViT) are specialised to their defaults
    so the graph has exactly one input.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    P = inspect.Parameter
    named = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in named and p.default is not P.empty}


def _drop_concrete_placeholders(graph: fx.Graph, concrete: dict[str, object]) -> None:
    """Removes the placeholders fx keeps for concrete arguments, with the checks it adds on them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    dead = set(placeholders)
    for node in graph.nodes:  # nodes computed only from those placeholders (the value checks)
        if node.op != "placeholder" and node.all_input_nodes and all(i in dead for i in node.all_input_nodes):
            dead.add(node)
    if any(user not in dead for node in dead for user in node.users):
        return  # a concrete argument feeds the computation itself: keep the signature as it is
    for node in reversed(list(graph.nodes)):
        if node in dead:
            graph.erase_node(node)


def _failed_soft_leaf(model: nn.Module, tracer: "SiteTracer") -> type | None:
    """The innermost timm-registered module class on the failing call path, if any."""
    path = tracer.failed_path
    if not path or not tracer.soft_leaf_types:
        return None
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        module = model.get_submodule(".".join(parts[:k]))
        if isinstance(module, tracer.soft_leaf_types):
            return type(module)
    return None


def check_leaf_modules(model: nn.Module, specs: Sequence[LeafSpec]) -> None:
    """Raises ValueError naming the ``leaf_modules`` entries that match no module of ``model``."""
    if isinstance(specs, (str, type)):
        raise ValueError(f"leaf_modules must be a list, got {specs!r}. Hint: leaf_modules=[{specs!r}].")
    named = dict(model.named_modules())
    bad = [spec for spec in specs if not isinstance(spec, (str, type))]
    if bad:
        raise ValueError(f"leaf_modules entries must be module classes or dotted module paths, got {bad!r}.")
    types = {type(m) for m in named.values()}
    unmatched = [spec for spec in specs if (spec not in named if isinstance(spec, str)
                                            else not any(issubclass(t, spec) for t in types))]
    if unmatched:
        shown = [s if isinstance(s, str) else s.__name__ for s in unmatched]
        paths = [p for p in named if p][:6]
        raise ValueError(
            f"leaf_modules entries {shown} match no module of {type(model).__name__}. Hint: give module "
            f"classes, or dotted paths from model.named_modules() such as {paths}."
        )


def trace(model: nn.Module, extra_leaf_modules: Sequence[LeafSpec] = (),
          example_input: torch.Tensor | None = None) -> fx.Graph:
    """Traces ``model.forward`` in the model's current train/eval mode.

    With ``example_input``, branches on spatial sizes are decided on it (see :class:`SiteTracer`).

    Raises:
        ValueError: an entry of ``extra_leaf_modules`` matches no module of ``model``.
        TraceError: naming the innermost module that failed and how to keep it as a leaf.
    """
    check_leaf_modules(model, extra_leaf_modules)
    concrete = _default_arguments(model)
    kept_whole: list[type] = []
    while True:
        tracer = SiteTracer([*extra_leaf_modules, *kept_whole], example_input)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            if concrete:
                _drop_concrete_placeholders(graph, concrete)
            graph.kept_whole = tuple(kept_whole)  # type: ignore[attr-defined]  # timm-registered classes that had to stay one node
            graph.size_guards = tuple(tracer.size_guards)  # type: ignore[attr-defined]
            return graph
        except Exception as caught:
            err = caught
            soft = _failed_soft_leaf(model, tracer)
            if soft is None or soft in kept_whole:
                break
            kept_whole.append(soft)
    where = tracer.failed_path
    if where:
        culprit = model.get_submodule(where)
        hint = (f"keep it as one node: convert(..., leaf_modules=[{type(culprit).__name__}]) or "
                f"leaf_modules=['{where}'], or register it once with "
                f"tsm_surgery.register_leaf_module({type(culprit).__name__}, reason=...)")
        raise TraceError(
            f"torch.fx could not trace module '{where}' ({type(culprit).__name__}): "
            f"{type(err).__name__}: {err}\nHint: {hint}. A leaf runs as it is; a residual join "
            "inside it cannot be shifted."
        ) from err
    raise TraceError(
        f"torch.fx could not trace {type(model).__name__}.forward itself: {type(err).__name__}: {err}\n"
        "Hint: trace a wrapper whose forward takes only tensors, or mark the offending "
        "submodules with leaf_modules=[...]."
    ) from err


def trace_train_and_eval(model: nn.Module, extra_leaf_modules: Sequence[LeafSpec] = (),
                         example_input: torch.Tensor | None = None) -> tuple[fx.Graph, fx.Graph]:
    """Traces the train and the eval graph; the model's mode is restored afterwards.

    Code that reads ``self.training`` in Python (drop path, auxiliary heads) is specialised at
    trace time, so the two modes can give different graphs; both are kept on purpose.
    """
    was_training = model.training
    try:
        graphs = []
        for mode in (True, False):
            model.train(mode)
            graphs.append(trace(model, extra_leaf_modules, example_input))
    finally:
        model.train(was_training)
    return graphs[0], graphs[1]

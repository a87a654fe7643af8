"""Graph-module plumbing shared by :class:`TSMNet` and :class:`OnlineTSM`.

Both networks run ``torch.fx`` graphs over the original model's module tree. This module owns
that tree handling (adoption, the shift container's name, site keys) and the one way both are
copied and pickled. It is the only place that touches private ``torch.fx`` API.
"""

import copy
import re
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.graph_module import _deserialize_graph_module, _format_import_block, _forward_from_src
from torch.package import sys_importer

SHIFTS = "temporal_shifts"  # the container holding one TemporalShift per site; it has no state
ONLINE_SHIFTS = "online_shifts"  # the container of the OnlineShift modules; no state

# rebuild(tree, graphs, *args) -> the network; a module-level function so that it pickles by name.
Rebuild = Callable[..., nn.Module]


def module_key(site_name: str) -> str:
    """The site's key in a shift container (module names cannot hold dots)."""
    return re.sub(r"\W", "_", site_name)


def adopt_module_tree(target: nn.Module, source: nn.Module, skip: Sequence[str] = ()) -> None:
    """Gives ``target`` exactly ``source``'s children, parameters and buffers, in order."""
    target._modules.clear()
    target._parameters.clear()
    target._buffers.clear()
    target._modules.update((k, v) for k, v in source._modules.items() if k not in skip)
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    # Tensors torch.fx lifted out of the traced code (a table built in forward): non-persistent
    # buffers, so they follow .to() and every graph module sharing this tree, and stay out of state_dict().
    constants = {k: v for k, v in vars(source).items()
                 if k.startswith("_tensor_constant") and isinstance(v, torch.Tensor)}
    for name, value in constants.items():
        target.__dict__.pop(name, None)
        target.register_buffer(name, value, persistent=False)


def module_tree(source: nn.Module, skip: Sequence[str] = ()) -> nn.Module:
    """A plain module holding ``source``'s tree (shared, not copied) and its training flag."""
    tree = nn.Module()
    adopt_module_tree(tree, source, skip)
    tree.training = source.training
    return tree


def _graph_source(graph: fx.Graph) -> str:
    code = graph.python_code("self")
    return _format_import_block(code.globals, sys_importer) + code.src


def _graph_from_source(src: str, tree: nn.Module) -> fx.Graph:
    # Like GraphModule's own pickling: trace the generated code again over the module tree.
    module = _deserialize_graph_module(_forward_from_src(src, {}), dict(tree.__dict__))
    assert isinstance(module, fx.GraphModule)
    return module.graph


def reduce_graph_module(module: nn.Module, graphs: Sequence[fx.Graph], rebuild: Rebuild, args: tuple,
                        state: dict[str, object]) -> tuple:
    """``__reduce__`` for a network of fx graphs over one module tree.

    fx graphs do not pickle; their generated code does. On load the tree is unpickled, each
    graph traced again from its code, and ``rebuild(tree, graphs, *args)`` makes the network;
    ``state`` (plain attributes such as a stream's caches) is then set on it.
    """
    sources = tuple(_graph_source(g) for g in graphs)
    return (_restore, (rebuild, module_tree(module), sources, args, state))


def _restore(rebuild: Rebuild, tree: nn.Module, sources: Sequence[str], args: tuple, state: dict[str, object]):
    net = rebuild(tree, [_graph_from_source(src, tree) for src in sources], *args)
    net.__dict__.update(state)
    return net


def deepcopy_graph_module(module: nn.Module, graphs: Sequence[fx.Graph], rebuild: Rebuild, args: tuple,
                          state: dict[str, object], memo: dict) -> nn.Module:
    """``__deepcopy__`` counterpart of :func:`reduce_graph_module`: same parts, copied instead of pickled."""
    tree = copy.deepcopy(module_tree(module), memo)
    net = rebuild(tree, [copy.deepcopy(g) for g in graphs], *copy.deepcopy(args, memo))
    net.__dict__.update(copy.deepcopy(state, memo))
    return net

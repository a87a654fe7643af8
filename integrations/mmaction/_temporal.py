"""Temporal modules placed at the boundary of a named module in a converted network.

Three rules of MMAction2's stock TSM backbones are placements rather than residual sites:

* ``MobileOneTSM`` shifts the input of every block: its blocks sum parallel single-layer
  branches (no residual join), and a shift outside the block keeps it reparameterisable;
* ``ResNetTSM``'s non-local blocks run after chosen residual blocks, on ``(N, C, T, H, W)``;
* its temporal pooling halves ``T`` after the first stage.

Each is one module inserted at the entry or the exit of a module path, in both the train and
the eval graph of a :class:`tsm_surgery.TSMNet`. The module paths come from the 2D network's
own tree, so the same rule holds for any network built that way.
"""

import fnmatch
import re
from typing import Iterable, List, Optional, Sequence, Set

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import tsm_surgery

__all__ = ["TemporalMaxPool", "NonLocalTSM", "downstream_targets", "insert_at", "path_matches", "shift_module_inputs",
           "temporal_modules"]


_SHIFTS = "temporal_shifts"  # where TSMNet keeps its shift modules


_BLOCK_INPUT = "the input of a block without a residual join, shifted for every branch (MobileOneTSM's rule)"


def _key(path: str) -> str:
    return re.sub(r"\W", "_", path)


def _frames(x: torch.Tensor, n_segments: int, name: str) -> int:
    if x.shape[0] % n_segments:
        raise ValueError(f"{name} got {x.shape[0]} frames, not a multiple of n_segments={n_segments}.")
    return x.shape[0] // n_segments


class TemporalMaxPool(nn.Module):
    """Max pooling over time (kernel 3, stride 2, padding 1): ``T`` frames in, ``T // 2`` out.

    Runs on folded clips ``(N*T, C, H, W)``, like ResNetTSM's ``temporal_pool``; ``T`` must be even.
    """

    def __init__(self, n_segments: int):
        super().__init__()
        self.n_segments = int(n_segments)
        self.pool = nn.MaxPool3d(kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.n_segments
        if t % 2:
            raise ValueError(f"temporal_pool halves the frames of a clip and needs an even num_segments, got {t}.")
        n = _frames(x, t, "temporal_pool")
        c, h, w = x.shape[1:]
        v = self.pool(x.view(n, t, c, h, w).transpose(1, 2))
        return v.transpose(1, 2).reshape(n * (t // 2), c, h, w)

    def extra_repr(self) -> str:
        return f"n_segments={self.n_segments}"


def NonLocalTSM(in_channels: int, n_segments: int, **cfg) -> nn.Module:
    """mmcv's ``NonLocal3d`` run on folded clips ``(N*T, C, H, W)`` as ``(N, C, T, H, W)`` volumes.

    Its parameters have ``NonLocal3d``'s own names, so ResNetTSM's ``non_local_block`` keys load.
    """
    from mmcv.cnn import NonLocal3d

    class _NonLocalTSM(NonLocal3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.n_segments
            n = _frames(x, t, "non_local")
            c, h, w = x.shape[1:]
            v = super().forward(x.view(n, t, c, h, w).transpose(1, 2).contiguous())
            return v.transpose(1, 2).reshape(n * t, c, h, w)

    _NonLocalTSM.__name__ = _NonLocalTSM.__qualname__ = "NonLocalTSM"
    module = _NonLocalTSM(in_channels, **cfg)
    module.n_segments = int(n_segments)
    return module


def path_matches(path: str, pattern: str) -> bool:
    """Glob match of a module path, segment by segment: ``stage[1-9].*`` is a stage's children only."""
    names, globs = path.split("."), pattern.split(".")
    return len(names) == len(globs) and all(fnmatch.fnmatchcase(n, g) for n, g in zip(names, globs))


def _paths(node: fx.Node) -> Set[str]:
    paths = {str(node.target)} if node.op == "call_module" else set()
    for value in node.meta.get("nn_module_stack", {}).values():
        paths.add(value[0] if isinstance(value, tuple) else str(value))
    return paths


def _inside(node: fx.Node, path: str) -> bool:
    return any(p == path or p.startswith(path + ".") for p in _paths(node))


def _members(graph: fx.Graph, path: str) -> Set[fx.Node]:
    """The nodes of module ``path``: its own operations, and operations outside any module (a shift
    inserted by the surgery) whose every user is one of them."""
    members: Set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if _inside(node, path):
            members.add(node)
        elif (node.op in ("call_module", "call_function", "call_method") and not node.meta.get("nn_module_stack")
              and node.users
              and all(u in members for u in node.users)):
            members.add(node)
    return members


def _boundary(graph: fx.Graph, path: str, where: str, members: Set[fx.Node]) -> fx.Node:
    if not members:
        raise ValueError(f"no operation of module {path!r} in the traced graph. Hint: name a module the "
                         "network calls in forward (see dict(model.named_modules())).")
    inside = [n for n in graph.nodes if n in members]
    if where == "after":
        found = [n for n in inside if any(u not in members for u in n.users)]
    else:
        found = list(dict.fromkeys(i for n in inside for i in n.all_input_nodes
                                   if i not in members and i.op != "get_attr"))
    if len(found) != 1:
        raise ValueError(f"module {path!r} has {len(found)} {'outputs' if where == 'after' else 'inputs'} "
                         f"in the traced graph ({[n.name for n in found][:4]}); a temporal module can only "
                         "be placed at a module with one tensor in and one out.")
    return found[0]


def insert_at(graphs: Iterable[fx.Graph], path: str, target: str, where: str) -> None:
    """Calls the module at ``target`` on the input (``where='before'``) or output (``'after'``) of ``path``.

    ``before`` feeds the module's result to ``path``'s own operations only; ``after`` to every
    operation outside ``path``. The module must be registered at ``target`` in the graphs' owner,
    which must then ``recompile()``.
    """
    for graph in graphs:
        members = _members(graph, path)
        anchor = _boundary(graph, path, where, members)
        with graph.inserting_after(anchor):
            new = graph.create_node("call_module", target, (anchor,))
        inside = where == "before"
        def moves(user, new=new, members=members, inside=inside):
            return user is not new and (user in members) == inside

        anchor.replace_all_uses_with(new, delete_user_cb=moves)


def downstream_targets(graph: fx.Graph, target: str) -> List[str]:
    """Targets of the ``call_module`` nodes that depend on the call of ``target`` (not itself)."""
    start = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    seen, stack = set(start), list(start)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return [str(n.target) for n in graph.nodes if n in seen and n.op == "call_module" and n.target != target]


def temporal_modules(net: nn.Module) -> List[nn.Module]:
    """Every module of ``net`` with an ``n_segments`` setting, in registration order."""
    return [m for m in net.modules() if isinstance(getattr(m, "n_segments", None), int)]


def _trace_pair(model: nn.Module):
    was_training = model.training
    graphs = []
    for mode in (True, False):
        model.train(mode)
        graphs.append(fx.Tracer().trace(model))
    model.train(was_training)
    return graphs


def shift_module_inputs(model: nn.Module, patterns: Sequence[str], n_segments: int, *, shift_div: int = 8,
                        direction: str = "bi", uni_slot: str = "past",
                        example_input: Optional[torch.Tensor] = None) -> "tsm_surgery.TSMNet":
    """Converts ``model`` by shifting the input of every module whose path matches ``patterns``.

    ``patterns`` are globs matched segment by segment (see :func:`path_matches`).

    The rule of networks whose blocks have no residual join (MobileOne): each matching module
    gets one :class:`tsm_surgery.TemporalShift` on its input. A module whose input has fewer
    channels than ``shift_div`` (the image) is left alone, as ``C // shift_div == 0`` channels
    would move. ``model``'s modules are reused (the returned net shares its parameters).
    """
    train_graph, eval_graph = _trace_pair(model)
    paths = [name for name, _ in model.named_modules() if name and any(path_matches(name, p) for p in patterns)]
    gm = fx.GraphModule(model, eval_graph)
    example = torch.randn(1, 3, 224, 224) if example_input is None else example_input
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    model.train(was_training)
    shifts, sites = nn.ModuleDict(), []
    for path in paths:
        entry = _boundary(eval_graph, path, "before", _members(eval_graph, path))
        shape = tuple(entry.meta["tensor_meta"].shape)
        if shape[1] < shift_div:
            continue
        shifts[_key(path)] = tsm_surgery.TemporalShift(n_segments, shift_div, direction, uni_slot=uni_slot)
        consumers = tuple(u.name for u in entry.users if _inside(u, path))
        sites.append(tsm_surgery.ResidualSite(name=path, kind="first_conv", join="", fork=entry.name,
                                              branch_consumers=consumers, channels=shape[1], channel_dim=1,
                                              shape=shape, reason=_BLOCK_INPUT))
    if not sites:
        raise ValueError(f"no module matching {list(patterns)} takes {shift_div} or more channels.")
    for site in sites:
        insert_at((train_graph, eval_graph), site.name, f"{_SHIFTS}.{_key(site.name)}", "before")
    return tsm_surgery.TSMNet(model, train_graph, eval_graph, shifts, sites, place="block")

"""Module boundaries in a traced graph: the input or the output of a named module.

Two uses: ``convert(..., shift_inputs=...)`` shifts the input of every matching module (the rule
of networks whose blocks sum parallel branches without a residual join, MobileOne), and
:func:`insert_module` calls a new module at a boundary of a converted network (a non-local block
after a residual block, a temporal pooling after a stage).

A module's nodes are the operations traced inside it (fx records the module stack of each
node), plus operations outside every module whose users are all inside it (a shift that
``convert`` inserted in front of the module).
"""

import fnmatch
from collections.abc import Sequence

from torch import fx, nn

from ._fast_paths import add_fast_paths, without_fast_paths
from ._index import GraphIndex
from ._net import TSMNet
from ._sites import ShiftSite

__all__ = ["insert_module", "input_sites", "path_matches", "WHERE"]

WHERE = ("before", "after")

_BLOCK_INPUT = "the input of a module matched by shift_inputs, shifted for every operation inside it"


def path_matches(path: str, pattern: str) -> bool:
    """Glob match of a module path, segment by segment: ``stage[1-9].*`` is a stage's children only."""
    names, globs = path.split("."), pattern.split(".")
    return len(names) == len(globs) and all(fnmatch.fnmatchcase(n, g) for n, g in zip(names, globs))


def _paths(node: fx.Node) -> set[str]:
    paths = {str(node.target)} if node.op == "call_module" else set()
    for value in node.meta.get("nn_module_stack", {}).values():
        paths.add(value[0] if isinstance(value, tuple) else str(value))
    return paths


def _inside(node: fx.Node, path: str) -> bool:
    return any(p == path or p.startswith(path + ".") for p in _paths(node))


def _members(graph: fx.Graph, path: str) -> set[fx.Node]:
    members: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if _inside(node, path):
            members.add(node)
        elif (node.op in ("call_module", "call_function", "call_method") and not node.meta.get("nn_module_stack")
              and node.users and all(u in members for u in node.users)):
            members.add(node)
    return members


def _boundary(graph: fx.Graph, path: str, where: str, members: set[fx.Node]) -> fx.Node:
    """The one node entering (``before``) or leaving (``after``) module ``path``."""
    if not members:
        raise ValueError(f"no operation of module {path!r} in the traced graph. Hint: name a module the "
                         "network calls in forward (see dict(model.named_modules())); a leaf's inside is not traced.")
    inside = [n for n in graph.nodes if n in members]
    if where == "after":
        found = [n for n in inside if any(u not in members for u in n.users)]
    else:
        found = list(dict.fromkeys(i for n in inside for i in n.all_input_nodes
                                   if i not in members and i.op != "get_attr"))
    if len(found) != 1:
        raise ValueError(f"module {path!r} has {len(found)} {'outputs' if where == 'after' else 'inputs'} "
                         f"in the traced graph ({[n.name for n in found][:4]}); a module can only be placed "
                         "at a module with one tensor in and one out.")
    return found[0]


def _insert_call(graph: fx.Graph, path: str, target: str, where: str) -> None:
    members = _members(graph, path)
    anchor = _boundary(graph, path, where, members)
    with graph.inserting_after(anchor):
        new = graph.create_node("call_module", target, (anchor,))
    inside = where == "before"

    def moves(user: fx.Node) -> bool:
        return user is not new and (user in members) == inside

    anchor.replace_all_uses_with(new, delete_user_cb=moves)


def input_sites(index: GraphIndex, patterns: Sequence[str], shift_div: int) -> list[ShiftSite]:
    """A site at the input of every module whose path matches one of ``patterns``.

    A module whose input has fewer channels than ``shift_div`` (the image, for a stem) is left
    out: ``C // shift_div`` would be 0 channels. The sites are of kind ``"block_entry"``: the
    tensor entering a block, read by the block's operations only.
    """
    graph = index.nodes[0].graph
    paths = [name for name in index.modules if name and any(path_matches(name, p) for p in patterns)]
    sites = []
    for path in paths:
        members = _members(graph, path)
        if not members:
            continue  # inside a leaf, or never called
        entry = _boundary(graph, path, "before", members)
        shape = index.shape(entry)
        if shape is None or len(shape) < 2 or shape[1] < shift_div:
            continue
        consumers = tuple(u.name for u in entry.users if u in members)
        sites.append(ShiftSite(name=path, kind="block_entry", join="", fork=entry.name,
                               branch_consumers=consumers, channels=int(shape[1]), channel_dim=1,
                               shape=tuple(shape), reason=_BLOCK_INPUT))
    return sites


def insert_module(net: TSMNet, name: str, module: nn.Module, *, at: str, where: str = "after") -> None:
    """Registers ``module`` in ``net`` as ``name`` and calls it on the input or output of module ``at``.

    The call goes into both the train and the eval graph. With ``where="after"`` every operation
    outside ``at`` that read its output reads the new module's output instead; with
    ``"before"``, the operations inside ``at`` read the new module's output of its input (a
    shift ``convert`` put at that input belongs to ``at``: the new module runs before it). The
    module runs on folded clips ``(N*T, C, H, W)`` like the rest of the network; its parameters
    and buffers join ``net.state_dict()`` under ``name``.

    Args:
        net: a network made by :func:`convert`.
        name: where to register ``module``, a dotted path whose parent exists in ``net``
            (``"layer1.0.non_local"``, or ``"pool"`` at the top).
        module: the module to call; it takes and returns one tensor.
        at: the module path whose boundary gets the call (``"layer1"``).
        where: ``"after"`` (its output) or ``"before"`` (its input).

    Raises:
        ValueError: ``at`` has no traced operation, or not exactly one tensor in (``before``) or
            out (``after``); ``name`` is taken; ``where`` is not one of :data:`WHERE`.

    Example:
        >>> import torch, torchvision, tsm_surgery
        >>> net = tsm_surgery.convert(torchvision.models.resnet18(), n_segments=4)
        >>> tsm_surgery.insert_module(net, "layer1.scale", torch.nn.Identity(), at="layer1")
        >>> "layer1.scale" in dict(net.named_modules())
        True
        >>> net(torch.randn(4, 3, 64, 64)).shape
        torch.Size([4, 1000])
    """
    if not isinstance(net, TSMNet):
        raise TypeError(f"insert_module takes a network made by tsm_surgery.convert, got {type(net).__name__}.")
    if where not in WHERE:
        raise ValueError(f"where={where!r} is not one of {WHERE}.")
    parent, _, attr = name.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    if hasattr(owner, attr):
        raise ValueError(f"{name!r} is already an attribute of the network; choose another name.")
    # The boundary is found on the plain graphs: the fast paths' marker nodes belong to no module.
    plain = [without_fast_paths(graph) for graph in (net.train_graph, net.eval_graph)]
    for graph in plain:  # both checked before either is written
        _boundary(graph, at, where, _members(graph, at))
    owner.add_module(attr, module)
    for graph in plain:
        _insert_call(graph, at, name, where)
    add_fast_paths(plain[0], plain[1], net)
    net.train_graph, net.eval_graph = plain
    net.train(net.training)

"""In-place writes around a shift site: where the shift goes so that the 2D model's aliasing holds.

In a 2D block ``x + branch(x)`` whose branch starts with an in-place op (``nn.ReLU(inplace=True)``,
``x.relu_()``), the op changes ``x`` itself and the shortcut adds the changed tensor. Shifting
``x`` before that op would let the op change the shifted copy instead: the shortcut would add
``x`` unchanged, and a consumer that saved the copy for backward could not rebuild it from ``x``.

So the shift goes after the in-place ops at the branch start, which stay on the trunk as in the
2D model, and the branch reads the shifted result. A block input written in place after the
branch read it (``x.add_(branch(x))``) keeps its shift, but that shift's output is then saved for
backward instead of rebuilt from the changed input. Any other write of the block input between
reads of the branch is refused with the site's name.

Writes are found two ways: by op (a module with ``inplace=True``, a method or function whose
name ends in ``_``, ``inplace=True``, ``operator.iadd`` and the like), which covers train-only
writes such as in-place dropout, and by the version counters of the analysis run, which also
see writes inside leaf modules. Aliases are tensors sharing a storage in that run.
"""

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx

from ._index import GraphIndex

__all__ = ["ShiftPlacement", "place_shift", "writes_in_place"]

_IN_PLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
}


def writes_in_place(node: fx.Node, index: GraphIndex) -> bool:
    """True when ``node`` is an op that writes its first argument, in some mode (dropout in training)."""
    if node.op == "call_module":
        return getattr(index.modules.get(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_function":
        if node.kwargs.get("inplace") is True or node.target in _IN_PLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


def _storage(index: GraphIndex, node) -> int | None:
    view = index.views.get(node) if isinstance(node, fx.Node) else None
    return view[0] if view else None


def _written(node: fx.Node, index: GraphIndex) -> set[int]:
    """The storages ``node`` writes."""
    keys = {_storage(index, i) for i in index.writes.get(node, ())}
    if node.args and writes_in_place(node, index):
        keys.add(_storage(index, node.args[0]))
    return {k for k in keys if k is not None}


def _same_tensor(index: GraphIndex, a: fx.Node, b: fx.Node) -> bool:
    view = index.views.get(a)
    return view is not None and view == index.views.get(b) and index.shape(a) == index.shape(b)


@dataclass(frozen=True)
class ShiftPlacement:
    """Where one site's shift goes.

    Attributes:
        source: the node whose tensor is shifted: the fork, or an in-place op's result that is the fork.
        before: the shift is inserted right before this node.
        readers: the nodes that read the shifted tensor instead of ``names``.
        names: ``source`` and the other nodes that are the same tensor (in-place results of it).
        recompute: False when the source is written after the shift, so a saved shift output
            cannot be rebuilt from it in backward.
    """

    source: fx.Node
    before: fx.Node
    readers: tuple[fx.Node, ...]
    names: tuple[fx.Node, ...]
    recompute: bool = True


def _refusal(site: str, node: fx.Node, why: str) -> ValueError:
    return ValueError(
        f"site {site!r}: {node.format_node()} changes the block input in place {why}, so no placement of "
        "the shift gives the branch and the shortcut what the 2D model gives them. Hint: build the model "
        "with that op out of place (inplace=False), or leave the site out with select=."
    )


def place_shift(index: GraphIndex, site: str, fork: fx.Node, readers: Sequence[fx.Node], place: str) -> ShiftPlacement:
    """Places one site's shift.

    Args:
        index: the analysed graph (with the run's views and writes).
        site: the site's name, for messages.
        fork: the node the branch starts from.
        readers: its consumers on the branch side (for ``place="residual"``).
        place: ``"residual"`` or ``"block"`` (every consumer of the fork reads the shifted tensor).

    Raises:
        ValueError: the block input is written in place where no placement keeps the 2D semantics.
    """
    key = _storage(index, fork)
    later = index.nodes[index.position[fork] + 1:]
    writers = [n for n in later if key is not None and key in _written(n, index)]
    if place == "block":
        _check_block(index, site, fork, writers)
        return ShiftPlacement(fork, fork.next, tuple(fork.users), (fork,))
    if not writers:
        return ShiftPlacement(fork, fork.next, tuple(readers), (fork,))
    trunk, plain = _split_branch_start(index, fork, list(readers), writers)
    if not plain:
        raise _refusal(site, trunk[-1], "and nothing on the branch reads the result")
    first, last = min(plain, key=index.position.__getitem__), max(plain, key=index.position.__getitem__)
    reads = [i for r in plain for i in r.all_input_nodes if _storage(index, i) == key]
    for node in reads:
        if not _same_tensor(index, node, fork):
            raise _refusal(site, node, "through a view of another shape or layout")
    for w in writers:
        if w not in trunk and index.position[first] < index.position[w] < index.position[last]:
            raise _refusal(site, w, "between two reads of the branch")
        if index.position[w] > index.position[first] and any(
                index.reaches(r, i) for r in plain for i in w.all_input_nodes if _storage(index, i) == key):
            raise _refusal(site, w, "through a view the branch made of it")
    late = any(index.position[w] > index.position[first] for w in writers)
    source = max(reads, key=index.position.__getitem__)
    return ShiftPlacement(source, first, tuple(plain), tuple(dict.fromkeys(reads)), not late)


def _split_branch_start(index: GraphIndex, fork: fx.Node, plain: list[fx.Node],
                        writers: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """Splits the branch start into trunk (in-place ops whose result is the fork, and what feeds
    them, such as a gate's pooling) and the readers of the result."""
    trunk: list[fx.Node] = []
    changed = True
    while changed:
        changed = False
        for r in list(plain):
            if r in writers and _same_tensor(index, r, fork):
                plain.remove(r)
                trunk.append(r)
                plain += [u for u in r.users if u not in plain and u not in trunk]
                changed = True
    feeding = [r for r in plain if any(index.reaches(r, w) for w in trunk)]
    return trunk + feeding, [r for r in plain if r not in feeding]


def _check_block(index: GraphIndex, site: str, fork: fx.Node, writers: list[fx.Node]) -> None:
    """``place="block"`` rewires every consumer of the fork, so writes through them stay consistent;
    only an older name of the same tensor (the input of the op that made the fork) can diverge."""
    if not writers:
        return
    key = _storage(index, fork)
    first_write = min(index.position[w] for w in writers)
    for alias in index.nodes[:index.position[fork]]:
        if _storage(index, alias) != key:
            continue
        late = [u for u in alias.users if index.position[u] >= first_write]
        if late:
            raise _refusal(site, writers[0], f"while {late[0].name} reads it under the older name {alias.name}")

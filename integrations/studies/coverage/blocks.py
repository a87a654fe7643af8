"""How much of a network a conversion reaches: blocks shifted and blocks kept whole, with reasons.

A *block* is a join of two activations of one shape: every addition
``find_residual_sites(all_joins=True)`` reports except the ``broadcast`` ones (position
embeddings, biases), plus the same-shape additions that run inside modules kept whole as one
graph node (leaves), which the site analysis cannot see. A join that lies inside another block
(Res2Net's split sums between the block's fork and its join, RepGhost's parallel sums inside a
downsampling block) is part of that block, not a block of its own; so are the parallel sums
that start where a shifted block entry starts (RepVGG).

A conversion that keeps more blocks whole than it shifts is *partial*.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

import tsm_surgery
from tsm_surgery.integrations.models.norms import is_norm

__all__ = ["Blocks", "count_blocks"]

_ADD_NAMES = {"add", "add_", "__add__", "__radd__", "__iadd__"}


@dataclass
class Blocks:
    """Blocks of one network.

    Attributes:
        shifted: blocks that got a shift (residual joins, or block entries under ``block_entry``).
        kept: reason -> number of blocks kept whole for that reason, e.g. ``"internal"``,
            ``"multi_branch"`` or ``"inside TinyVitBlock (kept whole)"``.
    """

    shifted: int = 0
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def kept_total(self) -> int:
        return sum(self.kept.values())

    @property
    def total(self) -> int:
        return self.shifted + self.kept_total

    @property
    def partial(self) -> bool:
        """More blocks kept whole than shifted."""
        return self.kept_total > self.shifted

    def describe(self) -> str:
        """``"2 of 12 shifted; kept whole: 10 inside TinyVitBlock (kept whole)"``."""
        text = f"{self.shifted} of {self.total} shifted"
        if self.kept:
            text += "; kept whole: " + ", ".join(f"{n} {why}" for why, n in sorted(self.kept.items()))
        return text


def _reachable(node: fx.Node, neighbours: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for other in neighbours(stack.pop()):
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return seen


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.all_input_nodes)


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.users)


def _spans(graph: fx.Graph, sites: Sequence[tsm_surgery.ShiftSite]) -> dict[str, set[fx.Node]]:
    """join name -> the nodes strictly between the join's fork and the join: the block's inside."""
    nodes = {n.name: n for n in graph.nodes}
    spans = {}
    for site in sites:
        fork, join = nodes.get(site.fork), nodes.get(site.join)
        if fork is not None and join is not None and site.kind != "block_entry":
            spans[site.join] = _descendants(fork) & _ancestors(join)
    return spans


def _leaf_nodes(net: fx.GraphModule) -> list[fx.Node]:
    """``call_module`` nodes that run a whole module tree or a non-torch module as one node."""
    leaves = []
    for node in net.graph.nodes:
        if node.op != "call_module":
            continue
        module = net.get_submodule(node.target)
        if isinstance(module, tsm_surgery.TemporalShift) or is_norm(module):
            continue
        if any(True for _ in module.children()) or not type(module).__module__.startswith("torch.nn"):
            leaves.append(node)
    return leaves


class _SameShapeAdds(TorchFunctionMode):
    """Counts additions of two activations of one shape (parameters and broadcasts excluded)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _ADD_NAMES and len(args) >= 2 and _same_shape_activations(*args[:2]):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _same_shape_activations(a, b) -> bool:
    tensors = all(isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) for t in (a, b))
    return tensors and a.dim() >= 2 and a.shape == b.shape


def _joins_inside(model: nn.Module, paths: Iterable[str], image: torch.Tensor) -> dict[str, int]:
    """path -> same-shape additions made while the module at ``path`` runs on the model's input."""
    captured: dict[str, tuple] = {}

    def capture(path):
        def hook(_module, args, kwargs):
            captured.setdefault(path, (args, kwargs))
        return hook

    hooks = [model.get_submodule(p).register_forward_pre_hook(capture(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
    counts = {}
    for path, (args, kwargs) in captured.items():
        with torch.no_grad(), _SameShapeAdds() as counter:
            model.get_submodule(path)(*args, **kwargs)
        counts[path] = counter.count
    return counts


def count_blocks(model: nn.Module, net: fx.GraphModule, sites: Sequence[tsm_surgery.ShiftSite],
                 shifted_kind: str, image: torch.Tensor) -> Blocks:
    """Counts the blocks of ``model`` that ``net`` (its eval-mode conversion) shifts and keeps whole.

    Args:
        model: the 2D model, in eval mode (run once on ``image`` to look inside leaves).
        net: the converted network, in eval mode.
        sites: ``find_residual_sites(model, image, all_joins=True)``.
        shifted_kind: the site kind the conversion shifted (``"residual"`` or ``"block_entry"``).
        image: one input image batch.
    """
    shifted = [s for s in sites if s.kind == shifted_kind]
    blocks = Blocks(shifted=len(shifted))
    candidates = [s for s in sites if s.kind != "broadcast"]
    inside = set().union(*_spans(net.graph, candidates).values())  # joins inside another block belong to it
    shifted_forks = {s.fork for s in shifted}
    nodes = {n.name: n for n in net.graph.nodes}
    for site in candidates:
        if site.kind in (shifted_kind, "residual", "block_entry"):
            continue  # shifted, or a site of the policy not used
        if nodes.get(site.join) in inside or site.fork in shifted_forks:
            continue
        blocks.kept[site.kind] = blocks.kept.get(site.kind, 0) + 1
    leaves = {n.target: type(net.get_submodule(n.target)).__name__ for n in _leaf_nodes(net) if n not in inside}
    for path, count in _joins_inside(model, leaves, image).items():
        if count:
            why = f"inside {leaves[path]} (kept whole)"
            blocks.kept[why] = blocks.kept.get(why, 0) + count
    return blocks

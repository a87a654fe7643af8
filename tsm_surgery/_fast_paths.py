"""Graph edits that make a converted network's eager forward cheaper, and their removal.

* Train graph: a shift whose result feeds one plain 2D conv and nothing else, right after it,
  becomes one call of :func:`shifted_conv2d` (or :func:`shifted_conv_module`): an autograd unit
  that moves the block input's slots in place around the conv and its backward, with no
  shifted copy and nothing saved through Python (:mod:`._shifted_conv`). Every other consumer
  of a shift output runs between :func:`open_site_hooks` and :func:`close_site_hooks`, so the
  saved-tensor hooks that store a shift output as a recipe (``_recompute``) see only what those
  consumers save, not every tensor of the forward.
* Eval graph: a residual ``left + right`` whose left operand is a fresh layer output read only
  there adds into it (:mod:`._joins`), as an eager ``out += identity`` does: FX records
  ``+=`` as ``+``, which would allocate one more activation per block than the 2D network.
  A site whose shifted tensor feeds one layer that only reads it, right after the
  shift, runs the shift with ``swap=True`` (the slots of the block input move in place, with a
  scratch copy of the moving slots) and :func:`restore_slots` right after that layer, before
  any other reader of the block input. Anything else keeps the shifted copy: another node
  between the shift and its layer, a layer that is not a plain conv/linear/norm (an in-place
  op, a view, a module with hooks), a block input that is the network's input or a parameter,
  or one written in place after the shift. At run time the swap also needs no autograd, no
  tracer or compiler, and a block input that is dense and not a view of another tensor.

Both edits leave the shift nodes and their users as they were, so code that walks the graph
for the shifts (the online rewrite, MMAction2's module insertion) sees the same structure;
:func:`without_fast_paths` gives the plain graph (for TorchScript and the online rewrite).
"""

import copy
import operator

import torch
from torch import fx, nn

from ._graph_module import SHIFTS
from ._joins import _join, _join_in_place
from ._online_graph import swap_consumer
from ._recompute import close_site_hooks, open_site_hooks
from ._shift import restore_slots
from ._shifted_conv import shifted_conv2d, shifted_conv_module

__all__ = ["add_fast_paths", "without_fast_paths", "swapped_sites"]

_MARKERS = (open_site_hooks, close_site_hooks, restore_slots)


def _shift_nodes(graph: fx.Graph):
    return [n for n in graph.nodes if n.op == "call_module" and str(n.target).startswith(SHIFTS + ".")]


def _plain_conv2d(node: fx.Node, root: nn.Module) -> bool:
    """A 2D conv that :func:`shifted_conv2d` computes exactly: zero padding given as numbers."""
    if node.op == "call_function":
        padding = node.kwargs.get("padding", node.args[4] if len(node.args) > 4 else 0)
        return node.target is torch.conv2d and not isinstance(padding, str)
    module = root.get_submodule(str(node.target))
    return (type(module).forward is nn.Conv2d.forward and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _fuse_first_convs(graph: fx.Graph, root: nn.Module) -> None:
    for shift in _shift_nodes(graph):
        consumer = _swap_site(shift, root)
        if consumer is None or not _plain_conv2d(consumer, root):
            continue
        with graph.inserting_before(consumer):
            shift_module = graph.create_node("get_attr", str(shift.target))  # get_attr() would warn: a module
            if consumer.op == "call_module":
                args = (shift.args[0], shift_module, graph.create_node("get_attr", str(consumer.target)))
                fused = graph.call_function(shifted_conv_module, args)
            else:
                fused = graph.call_function(shifted_conv2d, (shift.args[0], shift_module, *consumer.args[1:]),
                                            dict(consumer.kwargs))
        consumer.replace_all_uses_with(fused)
        graph.erase_node(consumer)
        graph.erase_node(shift)


def _unfuse(graph: fx.Graph, fused: fx.Node) -> None:
    """``shift`` and its conv as two nodes again, in place of one :func:`_fuse_first_convs` call."""
    x, shift_module, *rest = fused.args
    assert isinstance(shift_module, fx.Node)
    with graph.inserting_before(fused):
        shifted = graph.call_module(str(shift_module.target), (x,))
        if fused.target is shifted_conv_module:
            (conv_module,) = rest
            assert isinstance(conv_module, fx.Node)
            conv = graph.call_module(str(conv_module.target), (shifted,))
        else:
            conv = graph.call_function(torch.conv2d, (shifted, *rest), dict(fused.kwargs))
    fused.replace_all_uses_with(conv)
    graph.erase_node(fused)
    for ref in (shift_module, *rest):
        if isinstance(ref, fx.Node) and ref.op == "get_attr" and not ref.users:
            graph.erase_node(ref)


def _add_site_hooks(graph: fx.Graph) -> None:
    for shift in _shift_nodes(graph):
        for user in list(shift.users):
            if user.op == "output":
                continue  # returned as it is: nothing saves it
            if user.prev.op == "call_function" and user.prev.target is open_site_hooks:
                continue  # already there (a copied or unpickled network)
            with graph.inserting_before(user):
                opened = graph.call_function(open_site_hooks, ())
            with graph.inserting_after(user):
                graph.call_function(close_site_hooks, (opened,))


def _swap_site(shift: fx.Node, root: nn.Module):
    """The layer that may read ``shift``'s result swapped in place, or None (then the site copies)."""
    source = shift.args[0]
    if shift.kwargs or len(shift.args) != 1 or not isinstance(source, fx.Node):
        return None
    written_after = not getattr(root.get_submodule(str(shift.target)), "recompute", True)
    if source.op in ("placeholder", "get_attr") or written_after:
        return None  # the caller's tensor, a parameter, or a block input written in place after the shift
    consumer = swap_consumer(shift, root)
    if consumer is None:
        return None
    between = shift.next
    while between is not consumer:
        if between.op != "get_attr":
            return None  # another node runs between the shift and its layer
        between = between.next
    return consumer


def _add_slot_swaps(graph: fx.Graph, root: nn.Module) -> None:
    for shift in _shift_nodes(graph):
        consumer = _swap_site(shift, root)
        if consumer is None:
            continue
        shift.kwargs = {"swap": True}
        with graph.inserting_after(consumer):
            graph.call_function(restore_slots, (shift.args[0],))


def add_fast_paths(train_graph: fx.Graph, eval_graph: fx.Graph, root: nn.Module) -> None:
    """Adds the shift-and-conv units and per-site recompute hooks to ``train_graph``, the in-place
    slot moves and joins to ``eval_graph``.

    Idempotent: a graph that has them already is left as it is.
    """
    _fuse_first_convs(train_graph, root)
    _add_site_hooks(train_graph)
    _add_slot_swaps(eval_graph, root)
    _join_in_place(eval_graph, root)


def swapped_sites(graph: fx.Graph) -> list:
    """Targets of the shift nodes of ``graph`` that move their slots in place.

    Example:
        >>> import torchvision, tsm_surgery
        >>> net = tsm_surgery.convert(torchvision.models.resnet18(), n_segments=4)
        >>> len(swapped_sites(net.eval_graph)) == len(net.sites)  # each branch's first conv reads its block input
        True
        >>> swapped_sites(without_fast_paths(net.eval_graph))
        []
    """
    return [str(n.target) for n in _shift_nodes(graph) if n.kwargs.get("swap")]


def without_fast_paths(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` without the nodes :func:`add_fast_paths` added."""
    graph = copy.deepcopy(graph)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in _MARKERS:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in (shifted_conv2d, shifted_conv_module):
            _unfuse(graph, node)
        elif node.op == "call_function" and node.target is _join:
            node.target = operator.add
    for shift in _shift_nodes(graph):
        shift.kwargs = {}
    return graph

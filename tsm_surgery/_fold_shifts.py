"""The online step with each shift folded into the layer that reads it: a form for graph runtimes.

At one frame a site replaces one slot of ``fold`` input channels of its branch's first layer
with the cache. That layer is linear in its input channels, so with ``W`` its weight::

    conv(x with the slot replaced by cache) = conv(x, W with the slot's input channels zeroed)
                                              + conv(cache, W[:, slot])

and the same for a linear layer on tokens. The folded graph has no channel split and concat of
the activation; it has one more small layer per site, reading only the cache, whose sum with the
main layer a runtime can fuse. The two forms differ by float rounding only.

Which form is cheaper depends on the runtime (see ``docs/deploy.md``): OpenVINO's CPU plugin
turns each split and concat into a VariadicSplit and layout reorders, and runs the folded form
faster; onnxruntime and ExecuTorch run the concat form as fast or faster.
"""

import copy
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from ._fast_paths import without_fast_paths
from ._graph_module import ONLINE_SHIFTS, SHIFTS
from ._online_graph import OnlineShift, _restore_slot
from ._shift import TemporalShift

__all__ = ["fold_shifts", "fold_clip_shifts"]

_FOLDED = "folded"  # holds the new weights in the folded graph's root


def fold_shifts(step: fx.GraphModule) -> fx.GraphModule:
    """A copy of an online step graph in which each site's shift is folded into its first layer.

    A site is folded when its shifted tensor is read by exactly one ``nn.Conv2d`` (``groups=1``,
    zero padding, channels on dim 1) or ``nn.Linear`` (channels last), or the same layer as a
    ``torch.conv2d``/``F.linear`` call on a constant weight. Any other site keeps its shift. The
    step's modules are shared, never modified: the folded weights are new tensors, copies.

    Args:
        step: :attr:`OnlineTSM.step_module`.

    Returns:
        A graph module with ``step``'s inputs and outputs (``(frames, *caches) -> (out, *new_caches)``)
        and ``folded_sites``, the sites folded, in graph order.

    Example:
        >>> import torchvision, tsm_surgery
        >>> net = tsm_surgery.convert(torchvision.models.resnet18(), n_segments=8, direction="uni")
        >>> online = tsm_surgery.to_online(net, frame_shape=(3, 64, 64))
        >>> folded = fold_shifts(online.step_module)
        >>> len(folded.folded_sites) == len(online.state_names)
        True
    """
    root, graph = _folding_root("step", step, copy.deepcopy(step.graph))
    folded: list[str] = []
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(f"step.{ONLINE_SHIFTS}."):
            shift = root.get_submodule(str(node.target))
            assert isinstance(shift, OnlineShift)
            if _fold_site(graph, root, node, shift, key=f"site{len(folded)}"):
                folded.append(shift.site)
    return _folded_module(root, graph, "FoldedOnlineStep", folded)


def fold_clip_shifts(net: nn.Module, eval_graph: fx.Graph) -> fx.GraphModule:
    """A copy of a uni-directional clip network with each site's shift folded into its first layer.

    The clip form of :func:`fold_shifts`: ``conv(shift(x))`` becomes ``conv(x, W with the slot's
    input channels zeroed) + conv(past(x[:, slot]), W[:, slot])``, where ``past`` moves the slot's
    channels one frame later (zeros at each clip's first frame). Only the slot's ``fold`` channels
    move, and the two layers are the folded online step's, so an int8 quantization of both forms
    quantizes the same weights. Bi-directional sites keep their shift. The clip length is fixed at
    the network's ``n_segments`` when this is called; ``net`` is not modified.

    Args:
        net: a :class:`~tsm_surgery.TSMNet`.
        eval_graph: its eval graph (``net.eval_graph``).

    Returns:
        A graph module taking and returning what ``net`` does in eval mode, with ``folded_sites``.

    Example:
        >>> import torch, torchvision, tsm_surgery
        >>> net = tsm_surgery.convert(torchvision.models.resnet18(), n_segments=4, direction="uni").eval()
        >>> folded = fold_clip_shifts(net, net.eval_graph)
        >>> x = torch.randn(4, 3, 64, 64)
        >>> len(folded.folded_sites), torch.allclose(folded(x), net(x), atol=1e-5)
        (8, True)
    """
    root, graph = _folding_root("net", net, without_fast_paths(eval_graph))
    folded: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(f"net.{SHIFTS}."):
            continue
        shift = root.get_submodule(str(node.target))
        assert isinstance(shift, TemporalShift)
        found = _single_layer(node, [], root, shift.channel_dim) if shift.direction == "uni" else None
        if found is None:
            continue
        reader, layer = found
        start, fold = _slot(layer, shift.shift_div, 0 if shift.uni_slot == "first" else 1)
        with graph.inserting_before(reader):
            slot = graph.call_method("narrow", (node.args[0], shift.channel_dim, start, fold))
            moved = graph.call_function(past_frames, (slot, shift.n_segments))
            total = _folded_layer(graph, root, layer, f"site{len(folded)}", node.args[0], moved, start, fold)
        reader.replace_all_uses_with(total)
        graph.erase_node(reader)
        graph.erase_node(node)
        folded.append(str(node.target).removeprefix(f"net.{SHIFTS}."))
    return _folded_module(root, graph, "FoldedClipNetwork", folded)


def _folding_root(name: str, module: nn.Module, graph: fx.Graph) -> tuple[nn.Module, fx.Graph]:
    """A root holding ``module`` under ``name`` and the folded weights, and ``graph`` (a copy) retargeted to it."""
    root = nn.Module()
    root.add_module(name, module)
    root.add_module(_FOLDED, nn.Module())
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = f"{name}.{node.target}"
    return root, graph


def _folded_module(root: nn.Module, graph: fx.Graph, class_name: str, folded: list[str]) -> fx.GraphModule:
    graph.lint()
    module = fx.GraphModule(root, graph, class_name=class_name)
    module.__dict__["folded_sites"] = folded  # a plain attribute, not a submodule or tensor
    return module.eval()


def past_frames(x: Tensor, n_segments: int) -> Tensor:
    """Each frame of ``x`` (``(N*T, ...)``, clips of ``n_segments`` contiguous frames) replaced by the
    frame before it, zeros at each clip's first frame; rank 4 at most inside."""
    shape = list(x.shape)
    clips = x.reshape([shape[0] // n_segments, n_segments, shape[1], -1])
    moved = torch.cat([torch.zeros_like(clips.narrow(1, 0, 1)), clips.narrow(1, 0, n_segments - 1)], dim=1)
    return moved.reshape(shape)


class _Layer(NamedTuple):
    """A linear layer as its functional call: ``function(input, weight, bias, *options)``."""

    function: Callable[..., Tensor]
    weight: Tensor
    bias: str | None  # the target of the layer's own bias, read where it is
    options: tuple[Any, ...]  # stride, padding, dilation, groups of a convolution


def _fold_site(graph: fx.Graph, root: nn.Module, node: fx.Node, shift: OnlineShift, key: str) -> bool:
    """Replaces ``node`` (a site's online shift) and its layer by the folded layers; False to keep them."""
    outputs = {user.args[1]: user for user in node.users if user.target is operator.getitem}
    if len(outputs) != len(node.users) or set(outputs) != {0, 1}:
        return False
    shifted, new_cache = outputs[0], outputs[1]
    restores = [u for u in shifted.users if u.op == "call_function" and u.target is _restore_slot]
    found = _single_layer(shifted, restores, root, shift.channel_dim)
    if found is None:
        return False
    reader, layer = found
    source, cache = node.args[0], node.args[1]
    start, fold = _slot(layer, shift.shift_div, shift.slot)
    with graph.inserting_before(reader):
        total = _folded_layer(graph, root, layer, key, source, cache, start, fold)
        kept = graph.call_method("clone", (graph.call_method("narrow", (source, shift.channel_dim, start, fold)),))
    reader.replace_all_uses_with(total)
    new_cache.replace_all_uses_with(kept)
    for dead in (*restores, reader, shifted, new_cache, node):
        graph.erase_node(dead)
    return True


def _single_layer(shifted: fx.Node, ignored: list[fx.Node], root: nn.Module, channel_dim: int
                  ) -> tuple[fx.Node, "_Layer"] | None:
    """The one conv/linear layer reading ``shifted`` (besides ``ignored``) on its channels, or None."""
    readers = [u for u in shifted.users if u not in ignored]
    if len(readers) != 1 or readers[0].args[:1] != (shifted,) or shifted in readers[0].args[1:]:
        return None
    layer = _as_layer(readers[0], root)
    if layer is None or channel_dim not in _CHANNEL_DIMS[layer.function]:
        return None
    return readers[0], layer


def _slot(layer: "_Layer", shift_div: int, slot: int) -> tuple[int, int]:
    fold = layer.weight.shape[1] // shift_div
    return slot * fold, fold


def _folded_layer(graph: fx.Graph, root: nn.Module, layer: "_Layer", key: str, source: fx.node.Argument,
                  moved: fx.node.Argument, start: int, fold: int) -> fx.Node:
    """``layer(source, W with the slot's input channels zeroed) + layer(moved, W[:, slot])`` inserted in ``graph``."""
    main = layer.weight.detach().clone()
    main[:, start:start + fold] = 0
    side = layer.weight.detach()[:, start:start + fold].clone()
    holder = root.get_submodule(_FOLDED)
    holder.register_buffer(f"{key}_main", main)
    holder.register_buffer(f"{key}_side", side)
    bias = None if layer.bias is None else graph.get_attr(layer.bias)
    main_out = graph.call_function(layer.function, (source, graph.get_attr(f"{_FOLDED}.{key}_main"), bias,
                                                    *layer.options))
    side_out = graph.call_function(layer.function, (moved, graph.get_attr(f"{_FOLDED}.{key}_side"), None,
                                                    *layer.options))
    return graph.call_function(operator.add, (main_out, side_out))


_CHANNEL_DIMS = {F.conv2d: (1, -3), F.linear: (-1,)}  # where each layer reads its input channels


# The calls a traced layer shows up as (a conv wrapper with its own forward is traced into).
_FUNCTIONS: dict[Any, Callable[..., Tensor]] = {torch.conv2d: F.conv2d, F.conv2d: F.conv2d, F.linear: F.linear}


def _as_layer(node: fx.Node, root: nn.Module) -> _Layer | None:
    """The conv2d (``groups=1``, zero padding) or linear layer ``node`` runs on a constant weight, or None."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        own_bias = None if getattr(module, "bias", None) is None else f"{node.target}.bias"
        if type(module) is nn.Linear:
            return _Layer(F.linear, module.weight, own_bias, ())
        if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
            return _Layer(F.conv2d, module.weight, own_bias, (module.stride, module.padding, module.dilation, 1))
        return None
    function = _FUNCTIONS.get(node.target)
    if node.op != "call_function" or node.kwargs or function is None:
        return None
    weight, bias, *options = node.args[1:]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    groups = options[3] if len(options) > 3 else 1
    if groups != 1 or any(isinstance(o, fx.Node) for o in options):
        return None  # grouped, or options computed at run time
    return _Layer(function, _fetch(root, str(weight.target)), None if bias is None else str(bias.target),
                  tuple(options))


def _fetch(root: nn.Module, target: str) -> Tensor:
    owner, _, name = target.rpartition(".")
    value = getattr(root.get_submodule(owner), name)
    assert isinstance(value, Tensor)
    return value

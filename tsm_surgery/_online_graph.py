"""The online rewrite: a converted network's eval graph with each shift reading a cache.

Every ``TemporalShift`` node becomes an :class:`OnlineShift` node with a cache input, and the
graph returns the new caches next to the output: frame + caches in, output + new caches out,
no Python state. Run without autograd, most sites swap the cache into their input in place for
the length of one layer and swap it back (:func:`_restore_slot`); traced, exported or
differentiated, every site makes a shifted copy instead. Residual joins add in place where they
may (:mod:`._joins`).
"""

import operator
from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from ._graph_module import ONLINE_SHIFTS, SHIFTS
from ._joins import _join, _join_in_place  # noqa: F401  (_join: the name graphs pickled by 0.2.0 import)
from ._recompute import in_graph_capture
from ._shift import check_shift_args

__all__ = ["OnlineShift", "rewrite", "swap_consumer"]


class OnlineShift(nn.Module):
    """The streaming form of one uni-directional :class:`TemporalShift` site.

    ``forward(x, cache)`` takes the activation of the current frame ``x`` (``(N, C, ...)``, no
    time axis) and the cache (that slot of the previous frame, ``fold`` channels), and returns
    ``(shifted, new_cache)``: ``x`` with its moving slot replaced by the cache, and this frame's
    moving slot. The slot is channels ``[fold, 2*fold)`` (``uni_slot="past"``) or ``[0, fold)``
    (``uni_slot="first"``). A ``None`` cache stands for zeros (the first frame); it is used to
    learn the cache shapes.

    Example:
        >>> shift = OnlineShift("block", shift_div=4)
        >>> x = torch.arange(4.).reshape(1, 4, 1, 1)
        >>> out, cache = shift(x, torch.full((1, 1, 1, 1), -1.))
        >>> out.flatten().tolist(), cache.flatten().tolist()
        ([0.0, -1.0, 2.0, 3.0], [1.0])
    """

    def __init__(self, site: str, shift_div: int = 8, channel_dim: int = 1, uni_slot: str = "past"):
        super().__init__()
        check_shift_args(1, shift_div, "uni", uni_slot)
        self.site = site
        self.shift_div = int(shift_div)
        self.channel_dim = int(channel_dim)
        self.uni_slot = uni_slot
        self.slot = 1 if uni_slot == "past" else 0  # the moving slot's first channel, in folds

    def forward(self, x: Tensor, cache: Tensor | None, swap: bool = False) -> tuple[Tensor, Tensor]:
        """``swap=True`` lets the shift write the cache into ``x`` itself when that is safe (see
        :func:`_restore_slot`, which must then run right after the one consumer of the result)."""
        dim = self.channel_dim % x.dim()
        channels = x.shape[dim]
        fold = channels // self.shift_div
        start = self.slot * fold
        past = x.narrow(dim, start, fold)
        if cache is None:
            cache = torch.zeros_like(past)
        elif not torch.jit.is_tracing() and (cache.shape != past.shape or cache.dtype != x.dtype
                                             or cache.device != x.device):
            raise ValueError(
                f"site {self.site!r}: the cache is {describe(cache)} but this frame's activation needs "
                f"{describe(past)}. Hint: the state was made for frames of another size, batch, dtype "
                "or device; make a new one with init_state(batch_size, device, dtype, frame_shape=...) "
                "or call reset() on the internal-state form."
            )
        # A copy, not a view: a view would keep this frame's whole activation alive in the state.
        new_cache = past.clone()
        if swap and _can_swap(x):
            past.copy_(cache)
            return x, new_cache
        rest = x.narrow(dim, start + fold, channels - start - fold)
        if self.slot:
            return torch.cat([x.narrow(dim, 0, start), cache, rest], dim=dim), new_cache
        return torch.cat([cache, rest], dim=dim), new_cache

    def extra_repr(self) -> str:
        return (f"site={self.site!r}, shift_div={self.shift_div}, channel_dim={self.channel_dim}, "
                f"uni_slot={self.uni_slot!r}")


# Consumers that read their input once and neither keep it, return a view of it, nor write
# to it: the only kinds a shift may hand its input to with the slot swapped in place.
_SWAP_SAFE_CONSUMERS = (
    nn.modules.conv._ConvNd,  # first layer of a convolutional branch
    nn.Linear,  # first layer of an MLP branch on tokens
    nn.modules.batchnorm._NormBase,  # pre-activation branches start with a norm
    nn.LayerNorm,
    nn.GroupNorm,
)
# The same layers as traced functions (a conv wrapper with its own forward, such as mmcv's,
# is traced into and shows up as the functional call).
_SWAP_SAFE_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.layer_norm, F.group_norm,
    torch.conv1d, torch.conv2d, torch.conv3d,
}


def _can_swap(x: Tensor) -> bool:
    """In-place use of ``x`` is safe: no autograd, no exporter or tracer, no overlapping memory."""
    if torch.is_grad_enabled() or in_graph_capture():
        return False
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _restore_slot(x: Tensor, shifted: Tensor, new_cache: Tensor, channel_dim: int, slot: int = 1) -> None:
    """Undoes a swapped-in shift once its consumer has read ``x``: puts this frame's slot back.

    The online shift at one frame moves a single slot, so instead of a shifted copy of the whole
    activation (one read and one write of all of it), the swap writes the cache into ``x``, lets
    the branch's first layer read it, and writes the saved slot back: three copies of 1/shift_div
    of the channels. The shortcut, which runs later, sees ``x`` bit for bit as it was.
    """
    if isinstance(x, fx.Proxy):  # re-tracing a pickled graph: keep the node, it has no users
        x.tracer.create_proxy("call_function", _restore_slot, (x, shifted, new_cache, channel_dim, slot), {})
        return None
    if shifted is x:
        dim = channel_dim % x.dim()
        fold = new_cache.shape[dim]
        x.narrow(dim, slot * fold, fold).copy_(new_cache)


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def rewrite(graph: fx.Graph, keys: Sequence[str], root: nn.Module) -> fx.Graph:
    """Turns the shift nodes of an eval graph (without its fast paths) into online shifts with cache inputs and outputs.

    A site whose shifted tensor feeds one layer that only reads it (:data:`_SWAP_SAFE_CONSUMERS`,
    :data:`_SWAP_SAFE_FUNCTIONS`), and whose input is not the network's own input, gets the
    in-place slot swap: the online shift
    runs just before that layer and :func:`_restore_slot` just after it, so no other node can
    see the swapped activation.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(
            f"to_online needs a network whose forward takes one tensor (the frames); this one takes "
            f"{[n.target for n in placeholders]}. Hint: wrap it in a module whose forward(x) fills the others."
        )
    shift_nodes = {n.target: n for n in graph.nodes if n.op == "call_module" and str(n.target).startswith(SHIFTS + ".")}
    cursor = placeholders[0]
    caches, new_caches = [], []
    for key in keys:
        with graph.inserting_after(cursor):
            cursor = graph.placeholder(f"cache_{key}")
        caches.append(cursor)
    for key, cache in zip(keys, caches):
        node = shift_nodes.pop(f"{SHIFTS}.{key}", None)
        if node is None:
            raise RuntimeError(f"the eval graph has no shift node for {key!r}; was the network edited after convert?")
        shift = root.get_submodule(str(node.target))
        source, channel_dim, slot = node.args[0], shift.channel_dim, 1 if shift.uni_slot == "past" else 0
        consumer = swap_consumer(node, root)
        swap = consumer is not None and source.op != "placeholder"
        with graph.inserting_before(consumer if swap else node.next):
            pair = graph.call_module(f"{ONLINE_SHIFTS}.{key}", (source, cache, swap))
            shifted = graph.call_function(operator.getitem, (pair, 0))
            new_cache = graph.call_function(operator.getitem, (pair, 1))
        new_caches.append(new_cache)
        node.replace_all_uses_with(shifted)
        graph.erase_node(node)
        if swap:
            with graph.inserting_after(consumer):
                graph.call_function(_restore_slot, (source, shifted, new_cache, channel_dim, slot))  # type: ignore[arg-type]
    _join_in_place(graph, root)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], *new_caches),)
    graph.lint()
    return graph


def _from_data(node: fx.Node) -> bool:
    """True when ``node`` depends on a graph input (an activation), not only on parameters."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        for i in current.all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return False


def swap_consumer(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """The single consumer of a shift node, if it may read a swapped-in-place input."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    # The shifted tensor must be the layer's input and only that; the unshifted one not at all.
    if not user.args or user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
        return None
    if any(i is not node and _from_data(i) for i in user.all_input_nodes):
        return None  # another activation read during the swap may be a name of the swapped memory
    if user.op == "call_function":
        return user if user.target in _SWAP_SAFE_FUNCTIONS else None
    if user.op != "call_module":
        return None
    module = root.get_submodule(str(user.target))
    if not isinstance(module, _SWAP_SAFE_CONSUMERS) or module._forward_hooks or module._forward_pre_hooks:
        return None
    return user

"""Online (streaming) form of a uni-directional TSM network: one frame in, one output out.

A ``direction="uni"`` network only moves channels ``[fold, 2*fold)`` forward in time, so frame
t needs, at every shift site, that slot of frame t-1 and nothing else from the past. The
online form keeps exactly that slot per site as a *cache*: at each step every site replaces its
past slot with its cache and hands this frame's slot on as the next cache. Caches start at
zero, which is the offline network's zero padding before the first frame. Run over frames
0..t, the online outputs equal the offline uni network's outputs on the clip 0..t, for every t:
that equality is the definition this module is tested against.

The online form is built by rewriting a copy of the converted network's eval graph: every
``TemporalShift`` node becomes an :class:`OnlineShift` node reading a cache input, and the
graph returns the new caches next to the output. That explicit-state graph (frame + caches in,
output + new caches out, no Python state) is what :meth:`OnlineTSM.step` runs and what exports
to ONNX and ``torch.export``. Run without autograd, most sites swap the cache into their input
in place for the length of one layer and swap it back (:func:`_restore_slot`); traced, exported
or differentiated, every site makes a shifted copy instead.
"""

import copy
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from ._graph import ONLINE_SHIFTS, SHIFTS, adopt_module_tree, deepcopy_graph_module, module_key, module_tree
from ._graph import reduce_graph_module
from ._net import TSMNet
from ._recompute import in_graph_capture

__all__ = ["to_online", "OnlineTSM", "OnlineShift"]

State = Dict[str, Tensor]


class OnlineShift(nn.Module):
    """The streaming form of one uni-directional :class:`TemporalShift` site.

    ``forward(x, cache)`` takes the activation of the current frame ``x`` (``(N, C, ...)``, no
    time axis) and the cache (that slot of the previous frame, ``fold`` channels), and returns
    ``(shifted, new_cache)``: ``x`` with channels ``[fold, 2*fold)`` replaced by the cache, and
    this frame's channels ``[fold, 2*fold)``. A ``None`` cache stands for zeros (the first
    frame); it is used to learn the cache shapes.

    Example:
        >>> shift = OnlineShift("block", shift_div=4)
        >>> x = torch.arange(4.).reshape(1, 4, 1, 1)
        >>> out, cache = shift(x, torch.full((1, 1, 1, 1), -1.))
        >>> out.flatten().tolist(), cache.flatten().tolist()
        ([0.0, -1.0, 2.0, 3.0], [1.0])
    """

    def __init__(self, site: str, shift_div: int = 8, channel_dim: int = 1):
        super().__init__()
        self.site = site
        self.shift_div = int(shift_div)
        self.channel_dim = int(channel_dim)

    def forward(self, x: Tensor, cache: Optional[Tensor], swap: bool = False) -> Tuple[Tensor, Tensor]:
        """``swap=True`` lets the shift write the cache into ``x`` itself when that is safe (see
        :func:`_restore_slot`, which must then run right after the one consumer of the result)."""
        dim = self.channel_dim % x.dim()
        channels = x.shape[dim]
        fold = channels // self.shift_div
        past = x.narrow(dim, fold, fold)
        if cache is None:
            cache = torch.zeros_like(past)
        elif not torch.jit.is_tracing() and (cache.shape != past.shape or cache.dtype != x.dtype
                                             or cache.device != x.device):
            raise ValueError(
                f"site {self.site!r}: the cache is {_describe(cache)} but this frame's activation needs "
                f"{_describe(past)}. Hint: the state was made for frames of another size, batch, dtype "
                "or device; make a new one with init_state(batch_size, device, dtype, frame_shape=...) "
                "or call reset() on the internal-state form."
            )
        # A copy, not a view: a view would keep this frame's whole activation alive in the state.
        new_cache = past.clone()
        if swap and _can_swap(x):
            past.copy_(cache)
            return x, new_cache
        shifted = torch.cat([x.narrow(dim, 0, fold), cache, x.narrow(dim, 2 * fold, channels - 2 * fold)], dim=dim)
        return shifted, new_cache

    def extra_repr(self) -> str:
        return f"site={self.site!r}, shift_div={self.shift_div}, channel_dim={self.channel_dim}"


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


def _restore_slot(x: Tensor, shifted: Tensor, new_cache: Tensor, channel_dim: int) -> None:
    """Undoes a swapped-in shift once its consumer has read ``x``: puts this frame's slot back.

    The online shift at one frame moves a single slot, so instead of a shifted copy of the whole
    activation (one read and one write of all of it), the swap writes the cache into ``x``, lets
    the branch's first layer read it, and writes the saved slot back: three copies of 1/shift_div
    of the channels. The shortcut, which runs later, sees ``x`` bit for bit as it was.
    """
    if isinstance(x, fx.Proxy):  # re-tracing a pickled graph: keep the node, it has no users
        x.tracer.create_proxy("call_function", _restore_slot, (x, shifted, new_cache, channel_dim), {})
        return None
    if shifted is x:
        dim = channel_dim % x.dim()
        fold = new_cache.shape[dim]
        x.narrow(dim, fold, fold).copy_(new_cache)


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _rewrite(graph: fx.Graph, keys: Sequence[str], root: nn.Module) -> fx.Graph:
    """Turns the shift nodes of an eval graph into online shifts with cache inputs and outputs.

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
        source, channel_dim = node.args[0], root.get_submodule(str(node.target)).channel_dim
        consumer = _swap_consumer(node, root)
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
                graph.call_function(_restore_slot, (source, shifted, new_cache, channel_dim))
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], *new_caches),)
    graph.lint()
    return graph


def _swap_consumer(node: fx.Node, root: nn.Module) -> Optional[fx.Node]:
    """The single consumer of a shift node, if it may read a swapped-in-place input."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    # The shifted tensor must be the layer's input and only that; the unshifted one not at all.
    if not user.args or user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
        return None
    if node.args[0] in user.all_input_nodes:
        return None
    if user.op == "call_function":
        return user if user.target in _SWAP_SAFE_FUNCTIONS else None
    if user.op != "call_module":
        return None
    module = root.get_submodule(str(user.target))
    if not isinstance(module, _SWAP_SAFE_CONSUMERS) or module._forward_hooks or module._forward_pre_hooks:
        return None
    return user


class OnlineTSM(nn.Module):
    """A uni-directional TSM network that runs one frame at a time. Made by :func:`to_online`.

    Two forms of the same computation:

    * internal state: ``online(frames)`` with ``frames`` of shape ``(N, C, H, W)`` (one time
      step of ``N`` streams) returns the network's output for that step and keeps the caches;
      ``online.reset()`` starts all streams again, ``online.reset(mask)`` the streams where the
      boolean ``mask`` of shape ``(N,)`` is true. The stored caches are detached, so a long
      stream never grows an autograd graph; use :meth:`step` to backpropagate through time.
    * explicit state: ``state = online.init_state(N)`` (zeros, a dict keyed by site names) and
      ``out, state = online.step(frames, state)``, a pure function. :attr:`step_module` is the
      same computation as a module taking ``(frames, *caches)`` and returning
      ``(out, *new_caches)`` in :attr:`state_names` order, for ``torch.onnx`` and ``torch.export``.

    ``state_dict()`` keys are the original 2D model's. The module is returned in eval mode:
    the online form is the eval graph (training graphs specialise drop path and the like).

    A frame whose shape, batch, dtype or device differs from the running stream raises a
    ``ValueError`` naming both; streams are never reset silently.

    Attributes:
        state_names: the shifted sites, in graph order; the keys of every state dict.
        frame_shape: the per-frame shape ``(C, H, W)`` :meth:`init_state` uses by default
            (``None``: the example input ``convert`` saw).

    Example:
        >>> import torchvision
        >>> net = tsm_surgery.convert(torchvision.models.resnet18(), n_segments=8, direction="uni")
        >>> online = to_online(net)
        >>> online(torch.randn(2, 3, 64, 64)).shape          # 2 streams, one frame each
        torch.Size([2, 1000])
        >>> state = online.init_state(2, frame_shape=(3, 64, 64))
        >>> out, state = online.step(torch.randn(2, 3, 64, 64), state)
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, sites: Sequence, shift_div: int,
                 frame_shape: Optional[Sequence[int]] = None):
        super().__init__()
        adopt_module_tree(self, root)
        self.sites = list(sites)
        self.state_names: List[str] = [s.name for s in self.sites]
        self.shift_div = int(shift_div)
        self.frame_shape = None if frame_shape is None else tuple(int(d) for d in frame_shape)
        self.graph = graph
        step = fx.GraphModule(self, graph, class_name="OnlineStep")
        # The step module runs on this module's own tree: share the dicts (not copies), so
        # .to(), .half() and load_state_dict() on either are seen by both.
        for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            step.__dict__[attr] = self.__dict__[attr]
        object.__setattr__(self, "_step_module", step)  # not a registered child: no duplicate keys
        step.training = self.training
        self._state: Optional[State] = None
        self._stream: Optional[Tuple] = None
        self._cache_specs: Dict[Tuple, List[Tuple[Tuple[int, ...], torch.dtype]]] = {}

    def train(self, mode: bool = True) -> "OnlineTSM":
        # Exporters switch the module they are given to eval and back to its own flag: keep the
        # step module's flag equal to ours, or exporting it would leave our layers in train mode.
        self._step_module.training = mode
        return super().train(mode)

    # ------------------------------------------------------------------ explicit state
    @property
    def step_module(self) -> fx.GraphModule:
        """The explicit-state graph as a module: ``(frames, *caches) -> (out, *new_caches)``.

        Caches are positional, in :attr:`state_names` order. Export it with
        ``torch.onnx.export(online.step_module, (frames, *state.values()), ...)`` or
        ``torch.export.export(online.step_module, (frames, *state.values()))``.
        """
        return self._step_module

    def _specs(self, frame_shape: Optional[Tuple[int, ...]]) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
        """Per-site cache shape without the batch, and dtype, for frames of ``frame_shape``."""
        if frame_shape is None:
            frame_shape = self.frame_shape
        if frame_shape is None:  # the shapes convert saw on its example input
            specs = []
            for site in self.sites:
                shape = list(site.shape[1:])
                dim = site.channel_dim % len(site.shape) - 1
                shape[dim] = site.channels // self.shift_div
                specs.append((tuple(shape), self._param_dtype()))
            return specs
        frame_shape = tuple(int(d) for d in frame_shape)
        param = next(iter(self.parameters()), None)
        device = None if param is None else param.device
        # .double(), .to() and autocast (which gives each site its own dtype) change the answer.
        kind = "cpu" if device is None else device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        key = (frame_shape, self._param_dtype(), device, autocast)
        if key not in self._cache_specs:
            probe = torch.zeros((1,) + frame_shape, device=device, dtype=self._param_dtype())
            was_training = self.training
            if was_training:  # leave per-module modes alone unless we must switch
                self.eval()
            try:
                with torch.no_grad():
                    outs = self._step_module(probe, *[None] * len(self.state_names))
            except Exception as err:
                raise ValueError(f"cannot run the network on a frame of shape {frame_shape}: {type(err).__name__}: "
                                 f"{err}. Hint: frame_shape is (C, H, W) without the batch.") from err
            finally:
                if was_training:
                    self.train(True)
            self._cache_specs[key] = [(tuple(c.shape[1:]), c.dtype) for c in outs[1:]]
        return self._cache_specs[key]

    def _param_dtype(self) -> torch.dtype:
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        return torch.get_default_dtype() if param is None else param.dtype

    def init_state(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None,
                   frame_shape: Optional[Sequence[int]] = None) -> State:
        """Zero caches for ``batch_size`` new streams: the state before the first frame.

        Args:
            batch_size: number of streams ``N`` (the frames' batch).
            device: defaults to the parameters' device.
            dtype: defaults to the dtype each site's activation has: the parameters', or under
                ``torch.autocast`` the one autocast gives it when called inside the same autocast
                region with ``frame_shape`` (the first frame's shape).
            frame_shape: ``(C, H, W)`` of one frame; defaults to :attr:`frame_shape`, or the
                example input ``convert`` saw. Cache shapes depend on the frame size.

        Returns:
            Site name -> zero tensor of shape ``(batch_size, fold, h, w)`` (``fold`` on the
            site's channel dimension).

        Example:
            >>> state = online.init_state(1, frame_shape=(3, 64, 64))
            >>> list(state) == online.state_names
            True
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive number of streams, got {batch_size}.")
        if device is None:
            param = next(iter(self.parameters()), None)
            device = None if param is None else param.device
        specs = self._specs(None if frame_shape is None else tuple(frame_shape))
        return {name: torch.zeros((int(batch_size),) + shape, device=device, dtype=dtype or spec_dtype)
                for name, (shape, spec_dtype) in zip(self.state_names, specs)}

    def step(self, frames: Tensor, state: State) -> Tuple[Tensor, State]:
        """One time step with explicit state; neither argument is modified.

        Args:
            frames: ``(N, C, H, W)``, the current frame of each of ``N`` streams.
            state: from :meth:`init_state` or the previous :meth:`step`.

        Returns:
            ``(out, new_state)``: the network's output for these frames and the caches for
            the next step.

        Raises:
            ValueError: the state does not fit the frames (other batch, size, dtype or
                device), or misses sites.

        Example:
            >>> state = online.init_state(1, frame_shape=(3, 64, 64))
            >>> for frame in torch.randn(4, 1, 3, 64, 64):
            ...     out, state = online.step(frame, state)
        """
        missing = [n for n in self.state_names if n not in state]
        if missing:
            raise ValueError(f"the state lacks the sites {missing[:4]}{' ...' if len(missing) > 4 else ''}. "
                             "Hint: start from online.init_state(batch_size).")
        first = state[self.state_names[0]]
        if first.shape[0] != frames.shape[0] or first.device != frames.device:
            raise ValueError(
                f"frames have batch {frames.shape[0]} on {frames.device} but the state holds "
                f"{first.shape[0]} stream(s) on {first.device}. Hint: one frame per stream; make a "
                "matching state with init_state(batch_size, device=...)."
            )
        outs = self._step_module(frames, *[state[n] for n in self.state_names])
        return outs[0], dict(zip(self.state_names, outs[1:]))

    # ------------------------------------------------------------------ internal state
    def forward(self, frames: Tensor) -> Tensor:
        """Runs one time step of every stream and keeps the caches (see :meth:`reset`)."""
        stream = (tuple(frames.shape), frames.dtype, frames.device)
        if self._state is None:
            self._state = self.init_state(frames.shape[0], frames.device, frame_shape=tuple(frames.shape[1:]))
            self._stream = stream
        elif stream != self._stream:
            raise ValueError(
                f"this frame is {_describe(frames)} but the running streams got {_describe_stream(self._stream)}. "
                "Hint: call online.reset() to start new streams with the new input."
            )
        out, state = self.step(frames, self._state)
        self._state = {k: v.detach() for k, v in state.items()}
        return out

    def reset(self, mask: Optional[Tensor] = None) -> None:
        """Starts streams again: all of them, or those where ``mask`` is true.

        Args:
            mask: boolean ``(N,)``, one entry per stream of the running batch; its streams'
                caches become zero, the others keep theirs. ``None`` forgets all streams, and
                the next frame may have any batch or size.

        Example:
            >>> online.reset(torch.tensor([True, False]))   # stream 0 starts a new video
        """
        if mask is None or self._state is None:
            self._state, self._stream = None, None
            return
        mask = torch.as_tensor(mask)
        batch = self._stream[0][0]
        if mask.dtype != torch.bool or mask.shape != (batch,):
            raise ValueError(f"mask must be a boolean tensor of shape ({batch},), one entry per running stream; "
                             f"got {str(mask.dtype).replace('torch.', '')} of shape {tuple(mask.shape)}.")
        mask = mask.to(self._stream[2])
        self._state = {k: torch.where(mask.view((-1,) + (1,) * (v.dim() - 1)), torch.zeros_like(v), v)
                       for k, v in self._state.items()}

    @property
    def state(self) -> Optional[State]:
        """The internal-state form's current caches (``None`` before the first frame)."""
        return self._state

    def _parts(self):
        return (self.graph,), (self.sites, self.shift_div, self.frame_shape), {}

    def __reduce__(self):
        graphs, args, state = self._parts()
        return reduce_graph_module(self, graphs, _rebuild, args, state)

    def __deepcopy__(self, memo):
        graphs, args, state = self._parts()
        return deepcopy_graph_module(self, graphs, _rebuild, args, state, memo)


def _rebuild(tree: nn.Module, graphs: List[fx.Graph], sites: Sequence, shift_div: int, frame_shape) -> OnlineTSM:
    return OnlineTSM(tree, graphs[0], sites, shift_div, frame_shape).train(tree.training)


def _describe_stream(stream: Tuple) -> str:
    shape, dtype, device = stream
    return f"shape {shape} {str(dtype).replace('torch.', '')} on {device}"


def to_online(net: TSMNet, *, frame_shape: Optional[Sequence[int]] = None, inplace: bool = False) -> OnlineTSM:
    """Turns a uni-directional :class:`TSMNet` into a network that runs one frame at a time.

    Args:
        net: made by ``convert(model, direction="uni")``.
        frame_shape: ``(C, H, W)`` of one frame, the default of :meth:`OnlineTSM.init_state`
            (the internal-state form learns it from the first frame).
        inplace: share ``net``'s modules and parameters instead of copying them.

    Returns:
        An :class:`OnlineTSM` in eval mode whose ``state_dict()`` keys are ``net``'s.

    Raises:
        ValueError: ``net`` shifts in both directions (its frames need future frames).

    Example:
        >>> import timm
        >>> net = tsm_surgery.convert(timm.create_model("resnet18"), n_segments=8, direction="uni")
        >>> online = to_online(net)
        >>> scores = [online(frame) for frame in torch.randn(5, 1, 3, 64, 64)]  # frame by frame
        >>> online.reset()                                                      # next video
    """
    if not isinstance(net, TSMNet):
        raise TypeError(f"to_online takes a network made by tsm_surgery.convert, got {type(net).__name__}. "
                        "Hint: tsm_surgery.to_online(tsm_surgery.convert(model, direction='uni')).")
    shifts = net.shift_modules()
    bi = [name for name, shift in shifts.items() if shift.direction != "uni"]
    if bi:
        raise ValueError(
            f"to_online needs a uni-directional network, but {len(bi)} site(s) (e.g. {bi[0]!r}) shift "
            "direction='bi': their frame t reads frame t+1, which a stream has not seen yet, so no "
            "online form can equal the offline network. Hint: convert(model, direction='uni') and "
            "train (or fine-tune) that network for streaming."
        )
    if not inplace:
        net = copy.deepcopy(net)
    keys = [module_key(site.name) for site in net.sites]
    graph = _rewrite(copy.deepcopy(net.eval_graph), keys, net)
    root = module_tree(net, skip=(SHIFTS,))
    online_shifts = nn.ModuleDict()
    for site, key in zip(net.sites, keys):
        shift = shifts[site.name]
        online_shifts[key] = OnlineShift(site.name, shift.shift_div, shift.channel_dim)
    root.add_module(ONLINE_SHIFTS, online_shifts)
    online = OnlineTSM(root, graph, net.sites, net.shift_div, frame_shape)
    return online.eval()

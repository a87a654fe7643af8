"""Online (streaming) form of a uni-directional TSM network: one frame in, one output out.

A ``direction="uni"`` network moves one slot of ``fold`` channels forward in time (channels
``[fold, 2*fold)``, or ``[0, fold)`` with ``uni_slot="first"``), so frame t needs, at every
shift site, that slot of frame t-1 and nothing else from the past. The online form keeps
exactly that slot per site as a *cache*: at each step every site replaces its moving slot with
its cache and hands this frame's slot on as the next cache. Caches start at zero, which is the
offline network's zero padding before the first frame. Run over frames 0..t, the online outputs
equal the offline uni network's outputs on the clip 0..t, for every t: that equality is the
definition this module is tested against.

The online form is the converted network's eval graph rewritten by :mod:`._online_graph`
(frame + caches in, output + new caches out, no Python state): :meth:`OnlineTSM.step` runs it,
and it exports to ONNX and ``torch.export``.
"""

import copy
import threading
from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn

from ._fast_paths import without_fast_paths
from ._fold_shifts import fold_shifts
from ._graph_module import (
    ONLINE_SHIFTS,
    SHIFTS,
    adopt_module_tree,
    deepcopy_graph_module,
    module_key,
    module_tree,
    reduce_graph_module,
)
from ._net import TSMNet
from ._online_graph import OnlineShift, describe, rewrite

__all__ = ["to_online", "OnlineTSM", "OnlineShift"]

State = dict[str, Tensor]
_SHARED = ("one OnlineTSM is being fed from two threads at once ({what} while another call runs): its caches hold "
           "one set of streams, and interleaved frames would mix them. Hint: give each thread its own copy "
           "(copy.deepcopy(online)), or call online.step(frames, state) with a state per thread.")
_STREAM_ATTRIBUTES = ("_state", "_stream", "_cache_specs")  # the running streams, kept by copy and pickle


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

    ``state_dict()`` keys are the original 2D model's. The module runs in eval mode only (the
    online form is the eval graph; training graphs specialise drop path and the like, and a
    stream of single frames would update BatchNorm statistics one frame at a time):
    ``online.train()`` raises. ``copy.deepcopy`` and pickling keep the running streams, so a
    copy made mid-stream continues exactly as the original would.

    A frame whose shape, batch, dtype or device differs from the running stream raises a
    ``ValueError`` naming both; streams are never reset silently.

    Attributes:
        state_names: the shifted sites, in graph order; the keys of every state dict.
        frame_shape: the per-frame shape ``(C, H, W)`` :meth:`init_state` uses by default
            (``None``: the example input ``convert`` saw).

    Example:
        >>> import torchvision, tsm_surgery
        >>> net = tsm_surgery.convert(torchvision.models.resnet18(), n_segments=8, direction="uni")
        >>> online = to_online(net)
        >>> online(torch.randn(2, 3, 64, 64)).shape          # 2 streams, one frame each
        torch.Size([2, 1000])
        >>> state = online.init_state(2, frame_shape=(3, 64, 64))
        >>> out, state = online.step(torch.randn(2, 3, 64, 64), state)
    """

    _step_module: fx.GraphModule  # set in __init__, outside nn.Module's registry
    _busy: threading.Lock  # likewise

    def __init__(self, root: nn.Module, graph: fx.Graph, sites: Sequence, shift_div: int,
                 frame_shape: Sequence[int] | None = None):
        super().__init__()
        adopt_module_tree(self, root)
        self.sites = list(sites)
        self.state_names: list[str] = [s.name for s in self.sites]
        self.shift_div = int(shift_div)
        self.frame_shape = None if frame_shape is None else tuple(int(d) for d in frame_shape)
        self.graph = graph
        step = fx.GraphModule(self, graph, class_name="OnlineStep")
        # The step module runs on this module's own tree: share the dicts (not copies), so
        # .to(), .half() and load_state_dict() on either are seen by both.
        for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            step.__dict__[attr] = self.__dict__[attr]
        object.__setattr__(self, "_step_module", step)  # not a registered child: no duplicate keys
        self._state: State | None = None
        self._stream: tuple | None = None
        self._cache_specs: dict[tuple, list[tuple[tuple[int, ...], torch.dtype]]] = {}
        # Held while forward or reset runs: a second thread is refused, never made to wait (and never mixed in).
        object.__setattr__(self, "_busy", threading.Lock())
        self.eval()

    def train(self, mode: bool = True) -> "OnlineTSM":
        if mode:
            raise RuntimeError(
                "OnlineTSM runs in eval mode only: in train mode BatchNorm would normalise each frame by "
                "its own statistics and update the running statistics frame by frame. Hint: train the "
                "clip network (convert(model, direction='uni')) and call to_online on it; to "
                "backpropagate through time, call online.step(frames, state), which keeps the graph."
            )
        # Exporters switch the module they are given to eval and back to its own flag: keep the
        # step module's flag equal to ours, or exporting it would leave our layers in train mode.
        self._step_module.training = False
        return super().train(False)

    # ------------------------------------------------------------------ explicit state
    @property
    def step_module(self) -> fx.GraphModule:
        """The explicit-state graph as a module: ``(frames, *caches) -> (out, *new_caches)``.

        Caches are positional, in :attr:`state_names` order. Export it with
        ``torch.onnx.export(online.step_module, (frames, *state.values()), ...)`` or
        ``torch.export.export(online.step_module, (frames, *state.values()))``.
        """
        return self._step_module

    def folded_step_module(self) -> fx.GraphModule:
        """:attr:`step_module` with each site's shift folded into the layer that reads it, for graph runtimes.

        Where a site's branch starts with a convolution or linear layer, the shifted input
        ``conv(x with the slot replaced by the cache)`` becomes ``conv(x, W with the slot's input
        channels zeroed) + conv(cache, W[:, slot])``: no channel split and concat of the
        activation, one small extra layer. Same inputs and outputs as :attr:`step_module`, equal
        up to float rounding; the folded sites are in its ``folded_sites``. New weights are
        copies: this module and its parameters are not changed. Exporters where the concat is
        the expensive part (OpenVINO's CPU plugin) take this form.

        Example:
            >>> import torchvision, tsm_surgery
            >>> online = tsm_surgery.convert(torchvision.models.resnet18(), direction="uni", online=True)
            >>> folded = online.folded_step_module()
            >>> len(folded.folded_sites)                     # every branch starts with a conv
            8
        """
        return fold_shifts(self._step_module)

    def _specs(self, frame_shape: tuple[int, ...] | None) -> list[tuple[tuple[int, ...], torch.dtype]]:
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
            try:
                with torch.no_grad():
                    outs = self._step_module(probe, *[None] * len(self.state_names))
            except Exception as err:
                raise ValueError(f"cannot run the network on a frame of shape {frame_shape}: {type(err).__name__}: "
                                 f"{err}. Hint: frame_shape is (C, H, W) without the batch.") from err
            self._cache_specs[key] = [(tuple(c.shape[1:]), c.dtype) for c in outs[1:]]
        return self._cache_specs[key]

    def _param_dtype(self) -> torch.dtype:
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        return torch.get_default_dtype() if param is None else param.dtype

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype | None = None,
                   frame_shape: Sequence[int] | None = None) -> State:
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
            >>> import torchvision, tsm_surgery
            >>> online = tsm_surgery.convert(torchvision.models.resnet18(), direction="uni", online=True)
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

    def step(self, frames: Tensor, state: State) -> tuple[Tensor, State]:
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
            >>> import torchvision, tsm_surgery
            >>> online = tsm_surgery.convert(torchvision.models.resnet18(), direction="uni", online=True)
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
        """Runs one time step of every stream and keeps the caches (see :meth:`reset`).

        Raises:
            RuntimeError: another thread is inside ``forward`` or :meth:`reset` of this object.
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(_SHARED.format(what="a frame arrived"))
        try:
            return self._advance(frames)
        finally:
            self._busy.release()

    def _advance(self, frames: Tensor) -> Tensor:
        stream = (tuple(frames.shape), frames.dtype, frames.device)
        if self._state is None:
            self._state = self.init_state(frames.shape[0], frames.device, frame_shape=tuple(frames.shape[1:]))
            self._stream = stream
        elif stream != self._stream:
            assert self._stream is not None  # set with the state
            raise ValueError(
                f"this frame is {describe(frames)} but the running streams got {_describe_stream(self._stream)}. "
                "Hint: call online.reset() to start new streams with the new input."
            )
        out, state = self.step(frames, self._state)
        self._state = {k: v.detach() for k, v in state.items()}
        return out

    def reset(self, mask: Tensor | None = None) -> None:
        """Starts streams again: all of them, or those where ``mask`` is true.

        Args:
            mask: boolean ``(N,)``, one entry per stream of the running batch; its streams'
                caches become zero, the others keep theirs. ``None`` forgets all streams, and
                the next frame may have any batch or size.

        Example:
            >>> import torchvision, tsm_surgery
            >>> online = tsm_surgery.convert(torchvision.models.resnet18(), direction="uni", online=True)
            >>> _ = online(torch.randn(2, 3, 64, 64))        # two running streams
            >>> online.reset(torch.tensor([True, False]))   # stream 0 starts a new video
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(_SHARED.format(what="reset() was called"))
        try:
            self._reset(mask)
        finally:
            self._busy.release()

    def _reset(self, mask: Tensor | None) -> None:
        if mask is None or self._state is None:
            self._state, self._stream = None, None
            return
        assert self._stream is not None  # set with the state
        mask = torch.as_tensor(mask)
        batch = self._stream[0][0]
        if mask.dtype != torch.bool or mask.shape != (batch,):
            raise ValueError(f"mask must be a boolean tensor of shape ({batch},), one entry per running stream; "
                             f"got {str(mask.dtype).replace('torch.', '')} of shape {tuple(mask.shape)}.")
        mask = mask.to(self._stream[2])
        self._state = {k: torch.where(mask.view((-1,) + (1,) * (v.dim() - 1)), torch.zeros_like(v), v)
                       for k, v in self._state.items()}

    @property
    def state(self) -> State | None:
        """The internal-state form's current caches (``None`` before the first frame)."""
        return self._state

    def _parts(self):
        state = {k: self.__dict__[k] for k in _STREAM_ATTRIBUTES}
        return (self.graph,), (self.sites, self.shift_div, self.frame_shape), state

    def __reduce__(self):
        graphs, args, state = self._parts()
        return reduce_graph_module(self, graphs, _rebuild, args, state)

    def __deepcopy__(self, memo):
        graphs, args, state = self._parts()
        return deepcopy_graph_module(self, graphs, _rebuild, args, state, memo)


def _rebuild(tree: nn.Module, graphs: list[fx.Graph], sites: Sequence, shift_div: int, frame_shape) -> OnlineTSM:
    return OnlineTSM(tree, graphs[0], sites, shift_div, frame_shape)


def _describe_stream(stream: tuple) -> str:
    shape, dtype, device = stream
    return f"shape {shape} {str(dtype).replace('torch.', '')} on {device}"


def to_online(net: TSMNet, *, frame_shape: Sequence[int] | None = None, inplace: bool = False) -> OnlineTSM:
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
        >>> import timm, tsm_surgery
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
    graph = rewrite(without_fast_paths(net.eval_graph), keys, net)  # the online graph decides its own
    root = module_tree(net, skip=(SHIFTS,))
    online_shifts = nn.ModuleDict()
    for site, key in zip(net.sites, keys):
        shift = shifts[site.name]
        online_shifts[key] = OnlineShift(site.name, shift.shift_div, shift.channel_dim, shift.uni_slot)
    root.add_module(ONLINE_SHIFTS, online_shifts)
    return OnlineTSM(root, graph, net.sites, net.shift_div, frame_shape)

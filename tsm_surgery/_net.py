"""``TSMNet``: the clip network :func:`convert` returns."""

from collections.abc import Callable

import torch
from torch import fx, nn

from ._fast_paths import add_fast_paths, without_fast_paths
from ._fold_shifts import fold_clip_shifts
from ._graph_module import SHIFTS, adopt_module_tree, deepcopy_graph_module, module_key, reduce_graph_module
from ._recompute import in_graph_capture, install_recompute_scope
from ._shift import TemporalShift, check_shift_args
from ._sites import ShiftSite

__all__ = ["TSMNet", "SizeVariants"]

_COPIED_ATTRIBUTES = ("recompute_shifts", "size_variants")  # kept by copy and pickle


class TSMNet(fx.GraphModule):
    """A network converted by :func:`convert`.

    It holds the original module tree (so ``state_dict()`` keys are the original's) plus a
    ``temporal_shifts`` container without state, and runs the rewritten train-mode graph in
    training and the eval-mode graph otherwise.

    Attributes:
        sites: the shifted :class:`ShiftSite` objects, in graph order.
        shift_div, direction, uni_slot, place: the conversion settings.
    """

    size_variants: "SizeVariants | None"  # set by convert when a site lies inside a branch on the input size

    # TorchScript compiles properties; these read Python containers and are not part of forward.
    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "n_segments", "shift_div",  # noqa: RUF012
                                 "direction", "uni_slot"]

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph,
                 shifts: nn.ModuleDict, sites: list[ShiftSite], place: str, class_name: str | None = None):
        holder = nn.Module()
        adopt_module_tree(holder, root)
        holder.add_module(SHIFTS, shifts)
        # Per-site recompute hooks in training, in-place slot moves in eval (see _fast_paths).
        add_fast_paths(train_graph, eval_graph, holder)
        super().__init__(holder, eval_graph, class_name=class_name or type(root).__name__ + "TSM")
        adopt_module_tree(self, holder)
        self.train_graph, self.eval_graph = train_graph, eval_graph
        self.sites = list(sites)
        self.place = place
        # Training memory: shift outputs saved by their consumers are rebuilt in backward
        # instead of kept (see _recompute); `net.recompute_shifts = False` opts out.
        install_recompute_scope(self)
        self.train(root.training)

    def __call__(self, *args, **kwargs):
        variants = self.__dict__.get("size_variants")
        if variants is not None and args and isinstance(args[0], torch.Tensor) and not in_graph_capture():
            variants.serve(self, args[0])
        return super().__call__(*args, **kwargs)

    def train(self, mode: bool = True):
        graph = self.train_graph if mode else self.eval_graph
        if self.graph is not graph:
            self.graph = graph
        return super().train(mode)

    def shift_modules(self) -> dict[str, TemporalShift]:
        """Site name -> its :class:`TemporalShift` module."""
        return {site.name: getattr(self, SHIFTS)[module_key(site.name)] for site in self.sites}

    def _setting(self, attr):
        return getattr(next(iter(self.shift_modules().values())), attr)

    @property
    def n_segments(self) -> int:
        """Frames per clip. Settable: the graph is not traced again."""
        return self._setting("n_segments")

    @n_segments.setter
    def n_segments(self, value: int) -> None:
        check_shift_args(value, self.shift_div, self.direction, self.uni_slot)
        for shift in self.shift_modules().values():
            shift.n_segments = int(value)

    @property
    def shift_div(self) -> int:
        return self._setting("shift_div")

    @property
    def direction(self) -> str:
        return self._setting("direction")

    @property
    def uni_slot(self) -> str:
        return getattr(next(iter(self.shift_modules().values())), "uni_slot", "past")

    def __prepare_scriptable__(self) -> fx.GraphModule:
        # torch.jit.script calls this first. TorchScript would compile the recompute scope's
        # forward hooks and the fast paths' calls, which are Python only (saved-tensor hooks and
        # in-place slot moves do not exist in TorchScript), so it gets the current mode's plain
        # graph over the same modules, without the hooks.
        scriptable = fx.GraphModule(self, without_fast_paths(self.graph), class_name=type(self).__name__)
        scriptable.train(self.training)
        return scriptable

    def folded_module(self) -> fx.GraphModule:
        """The eval clip network with each uni site's shift folded into the layer that reads it.

        ``conv(shift(x))`` becomes ``conv(x, W with the slot zeroed) + conv(slot of the frame
        before, W[:, slot])``: the clip form of :meth:`OnlineTSM.folded_step_module`, with the same
        two layers per site, so both forms quantize the same weights. The folded sites are in its
        ``folded_sites``; this network is not changed.

        Example:
            >>> import torch, torchvision, tsm_surgery
            >>> net = tsm_surgery.convert(torchvision.models.resnet18(), n_segments=4, direction="uni")
            >>> len(net.folded_module().folded_sites)
            8
        """
        return fold_clip_shifts(self, self.eval_graph)

    def _parts(self):
        graphs = (self.train_graph, self.eval_graph)
        state = {k: self.__dict__[k] for k in _COPIED_ATTRIBUTES if k in self.__dict__}
        return graphs, (self.sites, self.place, type(self).__name__), state

    def __deepcopy__(self, memo):
        graphs, args, state = self._parts()
        return deepcopy_graph_module(self, graphs, _rebuild, args, state, memo)

    def __reduce__(self):
        graphs, args, state = self._parts()
        return reduce_graph_module(self, graphs, _rebuild, args, state)


def _rebuild(tree: nn.Module, graphs: list[fx.Graph], sites: list[ShiftSite], place: str,
             class_name: str) -> TSMNet:
    shifts = tree._modules.pop(SHIFTS)
    assert isinstance(shifts, nn.ModuleDict)
    return TSMNet(tree, graphs[0], graphs[1], shifts, sites, place, class_name)


class SizeVariants:
    """A network's graphs, one pair per branch its 2D model takes on the input size.

    A module may branch on the spatial size (timm's TinyViT block attends in one window when the
    map is the window's size and pads and partitions it otherwise). Tracing keeps the branch the
    example input took; where a shifted site lies inside such a branch, the network traces its
    2D model again the first time an input size is seen, keeps one pair of graphs per branch
    decision and runs the pair of each input's size, as ``torch.compile`` specialises again when
    a guard fails. Copies and pickles keep the active pair and trace the others again when needed.

    Attributes:
        decisions: the active pair's branch decisions; ``served`` maps input sizes to decisions.
    """

    def __init__(self, specialise: Callable, root: nn.Module, settings: dict, decisions: tuple):
        self.specialise, self.root, self.settings = specialise, root, settings
        self.decisions = decisions
        self.graphs: dict[tuple, tuple] = {}
        self.served: dict[tuple, tuple] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "graphs": {}, "served": {}}  # fx graphs neither copy nor pickle: traced again

    def serve(self, net: TSMNet, x: torch.Tensor) -> None:
        """Makes ``net`` run the graphs for ``x``'s size, tracing them on a first frame of it when new."""
        size = tuple(x.shape[1:])
        decisions = self.served.get(size)
        if decisions is None:
            with torch.no_grad():
                decisions, *graphs = self.specialise(net, self.root, self.settings, x[:1].detach())
            if decisions != self.decisions:
                self.graphs.setdefault(decisions, tuple(graphs))
            self.served[size] = decisions
        if decisions != self.decisions:
            self.graphs[self.decisions] = (net.train_graph, net.eval_graph, net.sites)
            net.train_graph, net.eval_graph, sites = self.graphs[decisions]
            net.sites = list(sites)
            self.decisions = decisions
            net.train(net.training)

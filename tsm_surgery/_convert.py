"""``convert``: insert temporal shifts at the residual sites of a traced 2D network."""

import copy
import fnmatch
import re
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import fx, nn
from torch.fx.graph_module import _deserialize_graph_module, _format_import_block, _forward_from_src
from torch.package import sys_importer

from ._shift import TemporalShift, check_shift_args, install_recompute_scope
from ._sites import ResidualSite, analyse_graph, default_example_input
from ._tracer import LeafSpec, trace_train_and_eval

__all__ = ["convert", "TSMNet", "PLACES"]

PLACES = ("residual", "block")
NO_RESIDUAL = ("error", "first_conv")  # policies for networks without a residual join
SHIFTS = "temporal_shifts"  # the container holding one TemporalShift per site; it has no state

Select = Union[None, str, Sequence[str], Callable[[ResidualSite], bool]]


def _module_key(site_name: str) -> str:
    return re.sub(r"\W", "_", site_name)


class TSMNet(fx.GraphModule):
    """A network converted by :func:`convert`.

    It holds the original module tree (so ``state_dict()`` keys are the original's) plus a
    ``temporal_shifts`` container without state, and runs the rewritten train-mode graph in
    training and the eval-mode graph otherwise.

    Attributes:
        sites: the shifted :class:`ResidualSite` objects, in graph order.
        shift_div, direction, place: the conversion settings.
    """

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph,
                 shifts: nn.ModuleDict, sites: List[ResidualSite], place: str, class_name: Optional[str] = None):
        holder = nn.Module()
        _adopt_module_tree(holder, root)
        holder.add_module(SHIFTS, shifts)
        super().__init__(holder, eval_graph, class_name=class_name or type(root).__name__ + "TSM")
        _adopt_module_tree(self, holder)
        self.train_graph, self.eval_graph = train_graph, eval_graph
        self.sites = list(sites)
        self.place = place
        # Training memory: shift outputs saved by their consumers are rebuilt in backward
        # instead of kept (see _shift.recompute_shifts); `net.recompute_shifts = False` opts out.
        install_recompute_scope(self)
        self.train(root.training)

    def train(self, mode: bool = True):
        graph = self.train_graph if mode else self.eval_graph
        if self.graph is not graph:
            self.graph = graph
        return super().train(mode)

    def shift_modules(self) -> Dict[str, TemporalShift]:
        """Site name -> its :class:`TemporalShift` module."""
        return {site.name: getattr(self, SHIFTS)[_module_key(site.name)] for site in self.sites}

    def _setting(self, attr):
        return getattr(next(iter(self.shift_modules().values())), attr)

    @property
    def n_segments(self) -> int:
        """Frames per clip. Settable: the graph is not traced again."""
        return self._setting("n_segments")

    @n_segments.setter
    def n_segments(self, value: int) -> None:
        check_shift_args(value, self.shift_div, self.direction)
        for shift in self.shift_modules().values():
            shift.n_segments = int(value)

    @property
    def shift_div(self) -> int:
        return self._setting("shift_div")

    @property
    def direction(self) -> str:
        return self._setting("direction")

    def __deepcopy__(self, memo):
        root = nn.Module()
        _adopt_module_tree(root, self, skip=(SHIFTS,))
        root.train(self.training)
        root = copy.deepcopy(root, memo)
        return TSMNet(root, copy.deepcopy(self.train_graph), copy.deepcopy(self.eval_graph),
                      copy.deepcopy(getattr(self, SHIFTS), memo), self.sites, self.place,
                      type(self).__name__)

    def __reduce__(self):
        # fx graphs do not pickle on their own; like GraphModule, pickle each graph's generated
        # code and trace it again on load.
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "train_graph", "eval_graph")}
        sources = []
        for graph in (self.train_graph, self.eval_graph):
            code = graph.python_code("self")
            sources.append(_format_import_block(code.globals, sys_importer) + code.src)
        return (_rebuild, (body, *sources, type(self).__name__))


def _rebuild(body: dict, train_src: str, eval_src: str, class_name: str) -> "TSMNet":
    train_gm, eval_gm = (_deserialize_graph_module(_forward_from_src(src, {}), body) for src in (train_src, eval_src))
    root = nn.Module()
    _adopt_module_tree(root, eval_gm, skip=(SHIFTS,))
    root.train(body["training"])
    return TSMNet(root, train_gm.graph, eval_gm.graph, getattr(eval_gm, SHIFTS), body["sites"], body["place"], class_name)


def _adopt_module_tree(target: nn.Module, source: nn.Module, skip=()) -> None:
    """Gives ``target`` exactly ``source``'s children, parameters and buffers, in order."""
    target._modules.clear()
    target._parameters.clear()
    target._buffers.clear()
    target._modules.update((k, v) for k, v in source._modules.items() if k not in skip)
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    # Tensors torch.fx lifted out of the traced code (a table built in forward): non-persistent
    # buffers, so they follow .to() and every graph module sharing this tree, and stay out of state_dict().
    constants = {k: v for k, v in vars(source).items() if k.startswith("_tensor_constant") and isinstance(v, torch.Tensor)}
    for name, value in constants.items():
        target.__dict__.pop(name, None)
        target.register_buffer(name, value, persistent=False)


def _select_sites(sites: List[ResidualSite], select: Select) -> List[ResidualSite]:
    if select is None:
        return sites
    if callable(select):
        return [s for s in sites if select(s)]
    patterns = [select] if isinstance(select, str) else list(select)
    return [s for s in sites if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def _insert_shifts(graph: fx.Graph, sites: List[ResidualSite], place: str) -> None:
    nodes = {node.name: node for node in graph.nodes}
    for site in sites:
        fork = nodes[site.fork]
        with graph.inserting_after(fork):
            shifted = graph.create_node("call_module", f"{SHIFTS}.{_module_key(site.name)}", (fork,))
        if place == "block":
            fork.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
        else:
            for consumer in site.branch_consumers:
                nodes[consumer].replace_input_with(fork, shifted)


def _no_sites_error(model: nn.Module, found: List[ResidualSite], select: Select) -> ValueError:
    if found:
        names = ", ".join(s.name for s in found[:6]) + (" ..." if len(found) > 6 else "")
        return ValueError(f"select={select!r} matched none of the {len(found)} residual sites ({names}). "
                          "Hint: select takes glob patterns over these names, or a callable(site) -> bool.")
    return ValueError(
        f"{type(model).__name__} has no residual join to shift: no addition of a deep branch and a "
        "shortcut was found. Hint: inspect the additions with "
        "tsm_surgery.find_residual_sites(model, all_joins=True); a residual block hidden inside a leaf "
        "module cannot be seen, so trace into it (drop it from leaf_modules). A network built without "
        "residual joins (DenseNet, VGG, Inception) converts with no_residual='first_conv', which shifts "
        "the input of each block's first layer."
    )


def convert(
    model: nn.Module,
    n_segments: int = 8,
    *,
    shift_div: int = 8,
    direction: str = "bi",
    place: str = "residual",
    select: Select = None,
    example_input: Optional[torch.Tensor] = None,
    leaf_modules: Sequence[LeafSpec] = (),
    inplace: bool = False,
    online: bool = False,
    no_residual: str = "error",
) -> Union[TSMNet, "OnlineTSM"]:
    """Turns a 2D image network into a Temporal Shift Module video network.

    The network is traced with ``torch.fx``; at every residual join found by
    :func:`find_residual_sites` one :class:`TemporalShift` is inserted where the residual
    branch starts. Inputs are clips with frames folded into the batch, ``(N*T, C, H, W)``.

    Args:
        model: the 2D network (a torchvision, timm or MMAction2 backbone, or your own).
        n_segments: frames per clip ``T``; can be changed later with ``net.n_segments = T``.
        shift_div: ``1/shift_div`` of the channels move each way.
        direction: ``"bi"`` (past and future, offline) or ``"uni"`` (past only; streamable
            with :func:`to_online`).
        place: ``"residual"`` shifts only the branch input, the shortcut sees the unshifted
            tensor (the paper's default); ``"block"`` shifts the block input for every consumer.
        select: which sites to shift: glob pattern(s) over site names (``"layer[34].*"``) or
            a callable ``site -> bool``. ``None`` shifts every residual site.
        example_input: one input batch used to learn shapes; defaults to one random image.
        leaf_modules: module classes or paths to keep as single nodes when tracing.
        inplace: reuse ``model``'s modules instead of deep-copying them. The returned network
            then shares parameters with ``model``; ``model`` itself keeps its forward.
        online: return ``to_online(net)``, the frame-by-frame streaming form (needs
            ``direction="uni"``), instead of the clip network.
        no_residual: what to do with a network that has no residual join (DenseNet, VGG,
            Inception, LCNet): ``"error"`` raises (the default); ``"first_conv"`` shifts the
            tensor entering the first layer(s) of each block instead (sites of kind
            ``"first_conv"``; see :func:`find_residual_sites`).

    Returns:
        A :class:`TSMNet` whose ``state_dict()`` keys are exactly ``model``'s, with no added
        parameters or buffers; with ``online=True`` the :class:`OnlineTSM` made from it.

    Raises:
        ValueError: bad settings, or no residual site to shift (with a hint).
        TraceError: a module could not be traced; the message names it.

    Example:
        >>> import torchvision
        >>> net = convert(torchvision.models.resnet18(), n_segments=8)
        >>> len(net.sites), net(torch.randn(2 * 8, 3, 64, 64)).shape
        (8, torch.Size([16, 1000]))

    When tracing fails:
        The :class:`TraceError` names the module; pass it in ``leaf_modules`` or register it
        with :func:`register_leaf_module`. Residual joins inside a leaf are not shifted.
    """
    check_shift_args(n_segments, shift_div, direction)
    if online and direction != "uni":
        raise ValueError(f"online=True needs direction='uni': with direction={direction!r} a frame reads "
                         "the next frame, which a stream has not seen yet. Hint: convert(..., direction='uni', online=True).")
    if place not in PLACES:
        raise ValueError(f"place={place!r} is not one of {PLACES}: 'residual' shifts the branch only, "
                         "'block' the block input for every consumer.")
    if no_residual not in NO_RESIDUAL:
        raise ValueError(f"no_residual={no_residual!r} is not one of {NO_RESIDUAL}.")
    root = model if inplace else copy.deepcopy(model)
    train_graph, eval_graph = trace_train_and_eval(root, leaf_modules)
    example_input = default_example_input(root) if example_input is None else example_input
    per_mode = {}
    for mode, graph in (("train", train_graph), ("eval", eval_graph)):
        _, found = analyse_graph(root, graph, example_input)
        residual = [s for s in found if s.kind == "residual"]
        if not residual and no_residual == "first_conv":
            residual = [s for s in found if s.kind == "first_conv"]
        chosen = _select_sites(residual, select)
        if not chosen:
            raise _no_sites_error(model, residual, select)
        per_mode[mode] = chosen
    # The eval graph decides the sites; the train graph shifts the same ones. Joins only the
    # train graph has (an auxiliary head, a train-only branch) stay unshifted.
    train_by_name = {s.name: s for s in per_mode["train"]}
    missing = [s.name for s in per_mode["eval"] if s.name not in train_by_name]
    if missing:
        raise RuntimeError(
            f"the train graph lacks residual sites of the eval graph ({missing[:6]}). Hint: mark the "
            "module whose forward depends on self.training as a leaf (leaf_modules=[...])."
        )
    per_mode["train"] = [train_by_name[s.name] for s in per_mode["eval"]]
    shifts = nn.ModuleDict()
    for site in per_mode["eval"]:
        if site.channels < shift_div:
            raise ValueError(f"site {site.name!r} has {site.channels} channels, fewer than shift_div={shift_div}. "
                             "Hint: lower shift_div or leave the site out with select=.")
        shifts[_module_key(site.name)] = TemporalShift(n_segments, shift_div, direction, site.channel_dim)
    _insert_shifts(train_graph, per_mode["train"], place)
    _insert_shifts(eval_graph, per_mode["eval"], place)
    net = TSMNet(root, train_graph, eval_graph, shifts, per_mode["eval"], place)
    if online:
        from ._online import to_online  # _online imports this module

        return to_online(net, frame_shape=tuple(example_input.shape[1:]), inplace=True)
    return net

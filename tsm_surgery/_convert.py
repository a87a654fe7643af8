"""``convert``: insert temporal shifts at the residual sites of a traced 2D network."""

import copy
import fnmatch
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from ._aliasing import place_shift
from ._boundary import input_sites
from ._fast_paths import add_fast_paths
from ._graph_module import SHIFTS, module_key
from ._index import GraphIndex
from ._net import SizeVariants, TSMNet
from ._online import OnlineShift, OnlineTSM, to_online
from ._shift import TemporalShift, check_shift_args
from ._sites import ShiftSite, analyse_graph, default_example_input
from ._tracer import MODULE_PATH, LeafSpec, trace_train_and_eval

__all__ = ["convert", "TSMNet", "PLACES"]

PLACES = ("residual", "block")
NO_RESIDUAL = ("error", "block_entry")  # policies for networks without a residual join
RENAMED_POLICIES = {"first_conv": "block_entry"}  # 0.1 names, still accepted (DeprecationWarning) for one release

Select = str | Sequence[str] | Callable[[ShiftSite], bool] | None
# (a graph's index, its classified joins) -> the sites that may be shifted
Candidates = Callable[[GraphIndex, list[ShiftSite]], list[ShiftSite]]


def _select_sites(sites: list[ShiftSite], select: Select) -> list[ShiftSite]:
    if select is None:
        return sites
    if callable(select):
        return [s for s in sites if select(s)]
    patterns = [select] if isinstance(select, str) else list(select)
    return [s for s in sites if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def _insert_shifts(index: GraphIndex, sites: list[ShiftSite], place: str) -> dict[str, bool]:
    """Inserts each site's shift where :func:`place_shift` puts it; returns which sites may recompute it."""
    graph = index.nodes[0].graph
    nodes = {node.name: node for node in index.nodes}
    plans = [place_shift(index, site.name, nodes[site.fork], [nodes[c] for c in site.branch_consumers], place)
             for site in sites]  # all plans first: they read the graph as analysed
    for site, plan in zip(sites, plans):
        with graph.inserting_before(plan.before):
            shifted = graph.create_node("call_module", f"{SHIFTS}.{module_key(site.name)}", (plan.source,))
        for reader in plan.readers:
            for name in plan.names:
                reader.replace_input_with(name, shifted)
    return {site.name: plan.recompute for site, plan in zip(sites, plans)}


def _no_sites_error(model: nn.Module, found: list[ShiftSite], select: Select, candidates: Candidates) -> ValueError:
    if isinstance(candidates, _InputSites) and not found:
        return ValueError(f"no module matched by shift_inputs={candidates.patterns} takes a tensor with "
                          "shift_div or more channels. Hint: shift_inputs takes glob patterns over module paths, "
                          "matched segment by segment ('stage[1-9].*'); see dict(model.named_modules()).")
    if found:
        names = ", ".join(s.name for s in found[:6]) + (" ..." if len(found) > 6 else "")
        return ValueError(f"select={select!r} matched none of the {len(found)} residual sites ({names}). "
                          "Hint: select takes glob patterns over these names, or a callable(site) -> bool.")
    return ValueError(
        f"{type(model).__name__} has no residual join to shift: no addition of a deep branch and a "
        "shortcut was found. Hint: inspect the additions with "
        "tsm_surgery.find_residual_sites(model, all_joins=True); a residual block hidden inside a leaf "
        "module cannot be seen, so trace into it (drop it from leaf_modules). A network built without "
        "residual joins (DenseNet, VGG, Inception) converts with no_residual='block_entry', which shifts "
        "the input of each block's first layer."
    )


def _current_policy(no_residual: str) -> str:
    """``no_residual`` under its current name (settings pickled by 0.1 may hold the old one)."""
    if no_residual in RENAMED_POLICIES:
        new = RENAMED_POLICIES[no_residual]
        warnings.warn(f"no_residual={no_residual!r} is deprecated; use no_residual={new!r} (same behaviour).",
                      DeprecationWarning, stacklevel=3)
        return new
    return no_residual


def _check_settings(model: nn.Module, direction: str, place: str, online: bool, no_residual: str) -> None:
    if online and direction != "uni":
        raise ValueError(f"online=True needs direction='uni': with direction={direction!r} a frame reads "
                         "the next frame, which a stream has not seen yet. "
                         "Hint: convert(..., direction='uni', online=True).")
    if place not in PLACES:
        raise ValueError(f"place={place!r} is not one of {PLACES}: 'residual' shifts the branch only, "
                         "'block' the block input for every consumer.")
    if no_residual not in NO_RESIDUAL:
        raise ValueError(f"no_residual={no_residual!r} is not one of {NO_RESIDUAL}.")
    if isinstance(model, (TSMNet, OnlineTSM)):
        raise ValueError(
            f"the model is already converted ({type(model).__name__}); converting it again would shift "
            "every site twice. Hint: change its settings through attributes (net.n_segments = T), or "
            "re-convert the original 2D model with the new settings."
        )
    shifted = next((name for name, m in model.named_modules() if isinstance(m, (TemporalShift, OnlineShift))), None)
    if shifted is not None:
        raise ValueError(
            f"the model already holds a temporal shift at {shifted!r}; converting it would shift its "
            "sites twice. Hint: convert the 2D model inside it instead, or change the converted part's "
            "settings through its attributes (n_segments)."
        )


class _InputSites:
    """The candidates of ``shift_inputs``: the inputs of the modules the patterns match."""

    def __init__(self, patterns: list[str], shift_div: int):
        self.patterns, self.shift_div = patterns, shift_div

    def __call__(self, index: GraphIndex, found: list[ShiftSite]) -> list[ShiftSite]:
        return input_sites(index, self.patterns, self.shift_div)


def _site_rule(no_residual: str, shift_inputs: str | Sequence[str] | None, shift_div: int) -> Candidates:
    """Which of a graph's sites may be shifted: residual ones (block entries as the fallback), or module inputs."""
    if shift_inputs is not None:
        return _InputSites([shift_inputs] if isinstance(shift_inputs, str) else list(shift_inputs), shift_div)

    def residual(index: GraphIndex, found: list[ShiftSite]) -> list[ShiftSite]:
        sites = [s for s in found if s.kind == "residual"]
        if not sites and no_residual == "block_entry":
            sites = [s for s in found if s.kind == "block_entry"]
        return sites

    return residual


def _choose_sites(root: nn.Module, graphs: dict[str, fx.Graph], example_input: torch.Tensor, select: Select,
                  candidates: Candidates, model: nn.Module
                  ) -> tuple[dict[str, list[ShiftSite]], dict[str, GraphIndex]]:
    """The sites to shift in each mode's graph (the eval graph's choice, found again in the train
    graph), and each graph's analysis."""
    per_mode, indexes = {}, {}
    for mode, graph in graphs.items():
        indexes[mode], found = analyse_graph(root, graph, example_input)
        allowed = candidates(indexes[mode], found)
        chosen = _select_sites(allowed, select)
        if not chosen:
            raise _no_sites_error(model, allowed, select, candidates)
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
    return per_mode, indexes


def _size_branches_without_sites(graphs: dict[str, fx.Graph], per_mode: dict[str, list[ShiftSite]]) -> list[str]:
    """Paths of the modules that branch on the example input's size and hold no chosen site.

    Rule: such a module is kept whole (a leaf), so it takes its own branch at every input size
    (timm's ``ConvMlp`` pads small maps up to its kernel); traced into, its branch would be
    frozen to the example's size. A site inside a size branch needs the traced branch.
    """
    whole: list[str] = []
    for mode, graph in graphs.items():
        nodes = {node.name: node for node in graph.nodes}
        site_paths = [nodes[name].meta.get(MODULE_PATH, "") for site in per_mode[mode]
                      for name in (site.join, *site.branch_consumers) if name in nodes]
        for path, _ in getattr(graph, "size_guards", ()):
            inside = any(p == path or p.startswith(path + ".") for p in site_paths)
            if path and not inside and path not in whole:
                whole.append(path)
    return whole


def _trace_sites(root: nn.Module, leaf_modules: Sequence[LeafSpec], example_input: torch.Tensor, select: Select,
                 candidates: Candidates, model: nn.Module):
    """Both graphs traced on ``example_input``, with the sites chosen in each and their analyses."""
    graphs = dict(zip(("train", "eval"), trace_train_and_eval(root, leaf_modules, example_input)))
    per_mode, indexes = _choose_sites(root, graphs, example_input, select, candidates, model)
    whole = _size_branches_without_sites(graphs, per_mode)
    if whole:  # trace again with them kept whole: they then run their own branch at any input size
        graphs = dict(zip(("train", "eval"), trace_train_and_eval(root, [*leaf_modules, *whole], example_input)))
        per_mode, indexes = _choose_sites(root, graphs, example_input, select, candidates, model)
    return graphs, per_mode, indexes


def _shift_graphs(graphs: dict[str, fx.Graph], per_mode: dict[str, list[ShiftSite]],
                  indexes: dict[str, GraphIndex], place: str, shifts: nn.ModuleDict,
                  make_shift: Callable[[ShiftSite], TemporalShift]) -> None:
    """Inserts a shift at every chosen site of both graphs, adding the sites' modules ``shifts`` lacks."""
    for site in per_mode["eval"]:
        key = module_key(site.name)
        if key in shifts:
            continue
        shift = make_shift(site)
        if site.channels < shift.shift_div:
            raise ValueError(f"site {site.name!r} has {site.channels} channels, fewer than "
                             f"shift_div={shift.shift_div}. Hint: lower shift_div or leave the site out with select=.")
        shifts[key] = shift
    recompute = [_insert_shifts(indexes[mode], per_mode[mode], place) for mode in ("train", "eval")]
    for site in per_mode["eval"]:
        # A site whose input is written after the shift (x.add_(branch(x))) keeps its shifted copy.
        placed = shifts[module_key(site.name)]
        assert isinstance(placed, TemporalShift)
        placed.recompute = placed.recompute and all(flags[site.name] for flags in recompute)


def _size_decisions(graphs: dict[str, fx.Graph]) -> tuple:
    """The branches both graphs took on the example's size; empty when nothing branched on it."""
    return tuple(tuple(getattr(graphs[mode], "size_guards", ())) for mode in ("train", "eval")) \
        if any(getattr(g, "size_guards", ()) for g in graphs.values()) else ()


def _specialise(net: TSMNet, root: nn.Module, settings: dict, example_input: torch.Tensor):
    """``net``'s graphs for the branches ``example_input``'s size takes: traced again from ``root``, its 2D model."""
    # Tensors held by the root itself (not a child) may have been replaced on the net by .to(): share them again.
    root._parameters.update({k: v for k, v in net._parameters.items() if k in root._parameters})
    root._buffers.update({k: v for k, v in net._buffers.items() if k in root._buffers})
    candidates = _site_rule(_current_policy(settings["no_residual"]), settings.get("shift_inputs"), net.shift_div)
    graphs, per_mode, indexes = _trace_sites(root, settings["leaf_modules"], example_input, settings["select"],
                                             candidates, root)
    _shift_graphs(graphs, per_mode, indexes, net.place, getattr(net, SHIFTS),
                  lambda site: TemporalShift(net.n_segments, net.shift_div, net.direction, site.channel_dim,
                                             net.uni_slot))
    add_fast_paths(graphs["train"], graphs["eval"], net)  # as TSMNet gives its first pair
    return _size_decisions(graphs), graphs["train"], graphs["eval"], per_mode["eval"]


def convert(
    model: nn.Module,
    n_segments: int = 8,
    *,
    shift_div: int = 8,
    direction: str = "bi",
    place: str = "residual",
    select: Select = None,
    example_input: torch.Tensor | None = None,
    leaf_modules: Sequence[LeafSpec] = (),
    inplace: bool = False,
    online: bool = False,
    no_residual: str = "error",
    uni_slot: str = "past",
    shift_inputs: str | Sequence[str] | None = None,
) -> TSMNet | OnlineTSM:
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
        uni_slot: with ``"uni"``, the channels that move from frame t-1: ``"past"``
            (``[fold, 2*fold)``, the slot a ``"bi"`` network reads from the past, so a bi-trained
            model keeps it) or ``"first"`` (``[0, fold)``, the paper's online demo).
        place: ``"residual"`` shifts only the branch input, the shortcut sees the unshifted
            tensor (the paper's default); ``"block"`` shifts the block input for every consumer.
        select: which sites to shift: glob pattern(s) over site names (``"layer[34].*"``) or
            a callable ``site -> bool``. ``None`` shifts every residual site.
        example_input: one input batch used to learn shapes; defaults to one random image.
        leaf_modules: module classes or paths to keep as single nodes when tracing; each must
            match a module of ``model``.
        inplace: reuse ``model``'s modules instead of deep-copying them. The returned network
            then shares parameters with ``model``; ``model`` itself keeps its forward.
        online: return ``to_online(net)``, the frame-by-frame streaming form (needs
            ``direction="uni"``), instead of the clip network.
        no_residual: what to do with a network that has no residual join (DenseNet, VGG,
            Inception, LCNet): ``"error"`` raises (the default); ``"block_entry"`` shifts the
            tensor entering the first layer(s) of each block instead (sites of kind
            ``"block_entry"``; see :func:`find_residual_sites`).
        shift_inputs: glob pattern(s) over module paths, matched segment by segment
            (``"stage[1-9].*"`` is a stage's children): shift the input of each matching module,
            for the operations inside it, instead of residual branches. The rule of networks
            whose blocks sum parallel branches without a residual join (MobileOne): a shift
            outside the block keeps the block reparameterisable. A module whose input has fewer
            channels than ``shift_div`` (the image) is left out. ``select`` filters these sites too.

    Returns:
        A :class:`TSMNet` whose ``state_dict()`` keys are exactly ``model``'s, with no added
        parameters or buffers; with ``online=True`` the :class:`OnlineTSM` made from it.

    Raises:
        ValueError: bad settings (each names its parameter), a model that is already converted,
            or no residual site to shift (with a hint).
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
    check_shift_args(n_segments, shift_div, direction, uni_slot)
    no_residual = _current_policy(no_residual)
    _check_settings(model, direction, place, online, no_residual)
    root = model if inplace else copy.deepcopy(model)
    example_input = default_example_input(root) if example_input is None else example_input
    candidates = _site_rule(no_residual, shift_inputs, shift_div)
    graphs, per_mode, indexes = _trace_sites(root, leaf_modules, example_input, select, candidates, model)
    shifts = nn.ModuleDict()
    _shift_graphs(graphs, per_mode, indexes, place, shifts,
                  lambda site: TemporalShift(n_segments, shift_div, direction, site.channel_dim, uni_slot))
    net = TSMNet(root, graphs["train"], graphs["eval"], shifts, per_mode["eval"], place)
    decisions = _size_decisions(graphs)
    if decisions:  # a site lies inside a branch on the input size: one graph pair per branch decision
        settings = {"leaf_modules": list(leaf_modules), "select": select, "no_residual": no_residual,
                    "shift_inputs": shift_inputs}
        net.size_variants = SizeVariants(_specialise, root, settings, decisions)
    if online:
        return to_online(net, frame_shape=tuple(example_input.shape[1:]), inplace=True)
    return net

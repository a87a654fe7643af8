"""Discovery: which additions in a traced network are residual joins, and where their branch starts.

For every addition of two tensors the fork is the latest node both operands depend on. Along
each operand we count *mixing* layers (convolutions, linear layers, matrix products; norms,
scales and activations do not count). A join is a block residual when one operand is deep
(two or more mixing layers: the residual branch) and the other shallow (the identity or a
one-layer projection: the shortcut). The other additions are reported, not shifted:

* ``broadcast``: an operand that does not come from the input (position embeddings, biases)
  or a different shape (broadcasting);
* ``multi_branch``: parallel single-layer branches summed (RepVGG, MobileOne, ACNet);
* ``internal``: any other sum inside a block (Res2Net's split sums, GRN's ``x + f(x)``).

Networks without any residual join (VGG, DenseNet, Inception) get ``block_entry`` entries
instead: the tensor entering the first layer(s) of each block, shifted only on request.
"""

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, get_args

import torch
from torch import fx, nn

from ._index import GraphIndex, common_prefix, is_add, is_layer, module_path, record
from ._no_residual import BlockEntry, block_entries
from ._tracer import LeafSpec, trace

__all__ = ["ShiftSite", "SiteKind", "KINDS", "SHIFTED_KINDS", "find_residual_sites", "site_table"]

SiteKind = Literal["residual", "block_entry", "multi_branch", "internal", "broadcast"]
KINDS: tuple[SiteKind, ...] = get_args(SiteKind)
SHIFTED_KINDS: tuple[SiteKind, ...] = ("residual", "block_entry")  # the kinds convert may shift


@dataclass(frozen=True)
class ShiftSite:
    """A place where ``convert`` may shift, or an addition it looked at and left alone.

    A residual join's site is where its branch starts; a block entry or a module input (see
    ``shift_inputs``) has no join. ``ResidualSite`` is this class's 0.1 name, deprecated.

    Attributes:
        name: stable name built from module paths, e.g. ``"layer2.1"`` or ``"blocks.0.attn"``.
        kind: ``"residual"`` (shifted), ``"multi_branch"``, ``"internal"``, ``"broadcast"``, or
            ``"block_entry"`` (the entry of a block in a network without residual joins, shifted
            only with ``convert(..., no_residual="block_entry")``).
        join: graph node name of the addition (``""`` for ``"block_entry"``: there is none).
        fork: graph node name of the tensor the residual branch starts from (for
            ``"block_entry"``, the tensor entering the block).
        branch_consumers: nodes reading ``fork`` on the branch side (rewired to the shifted tensor).
        shortcut_consumers: nodes reading ``fork`` on the shortcut side (left alone).
        channels: channel count of ``fork``.
        channel_dim: the dimension of ``fork`` holding channels (1 for NCHW, -1 for NHWC/tokens).
        shape: shape of ``fork`` for the example input.
        branch_depth: mixing layers on the branch; shortcut_depth likewise on the shortcut.
        reason: for joins that are not shifted, why.
    """

    name: str
    kind: SiteKind
    join: str
    fork: str
    branch_consumers: tuple[str, ...] = ()
    shortcut_consumers: tuple[str, ...] = ()
    channels: int = 0
    channel_dim: int = 1
    shape: tuple[int, ...] = ()
    branch_depth: int = 0
    shortcut_depth: int = 0
    reason: str = field(default="", compare=False)


class _Join(NamedTuple):
    """A classified addition and the common module path of its branch's mixing layers (for naming)."""

    site: ShiftSite
    scope: str = ""


def _not_a_join(index: GraphIndex, a: fx.Node, b: fx.Node, fork: fx.Node | None) -> tuple[SiteKind, str] | None:
    """Why the sum of ``a`` and ``b`` cannot be a block residual, or ``None`` if it may be one."""
    shapes = {index.shape(a) or (), index.shape(b) or ()}
    if not (index.from_input[a] and index.from_input[b]):
        return "broadcast", "one operand does not come from the input (a parameter or constant)"
    if len(shapes) != 1:
        return "broadcast", f"operands of different shapes {sorted(shapes)}"
    fork_shape = index.shape(fork)
    if fork_shape is None:
        return "internal", "the operands do not fork from one tensor"
    join_shape = index.shape(a) or ()
    if len(fork_shape) != len(join_shape):
        return "internal", (f"the sum has rank {len(join_shape)} but its fork rank {len(fork_shape)}: "
                            "a sum inside a layer (split heads), not a block residual")
    if index.batch is not None and fork_shape[0] != index.batch:
        return "internal", (f"the fork's leading dim {fork_shape[0]} is not the batch {index.batch}: "
                            "it folds windows or patches into the batch, not frames")
    return None


def _kind_by_depth(deep: int, shallow: int, shortcut_is_fork: bool, multi: bool) -> tuple[SiteKind, str]:
    if deep >= 2 and shallow <= 1:
        return "residual", ""
    if deep == 1 and shallow == 0 and shortcut_is_fork and not multi:
        return "residual", ""  # one layer wrapped in an identity residual (ConvMixer, conv position encodings)
    if (deep == 1 and shallow <= 1) or multi:
        return "multi_branch", "parallel single-layer branches (re-parameterisable sum), not a block residual"
    return "internal", f"mixing depths {deep} and {shallow}: a sum inside a block, not a residual join"


def _classify(index: GraphIndex, join: fx.Node, kinds: dict[fx.Node, SiteKind]) -> _Join | None:
    """Classifies one addition; ``kinds`` holds the additions classified before it."""
    operands = [a for a in join.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or any(index.shape(a) is None for a in operands):
        return None  # scalar additions and non-tensor values are not joins
    a, b = operands
    fork = index.fork(a, b)
    base = dict(join=join.name, fork=fork.name if fork is not None else "")
    early = _not_a_join(index, a, b, fork)
    if early is not None:
        return _Join(ShiftSite(name=join.name, kind=early[0], reason=early[1], join=base["join"], fork=base["fork"]))
    assert fork is not None  # _not_a_join refuses operands without a common fork
    depth_a, depth_b = index.depth(fork, a), index.depth(fork, b)
    branch, shortcut = (a, b) if depth_a >= depth_b else (b, a)
    deep, shallow = max(depth_a, depth_b), min(depth_a, depth_b)
    multi = any(kinds.get(x) == "multi_branch" for x in operands)
    kind, reason = _kind_by_depth(deep, shallow, shortcut is fork, multi)
    branch_nodes = index.branch_nodes(fork, branch)
    mixing = [n for n in branch_nodes if index.is_mixing(n)]
    if kind == "residual" and mixing and not is_layer(mixing[0]):
        kind, reason = "internal", ("the branch starts with a product of activations (q @ k inside attention), "
                                    "not a layer: a sum inside a layer, not a block residual")
    on_shortcut = [u for u in fork.users if index.reaches(u, shortcut) or u is join]
    on_branch = [u for u in fork.users if u not in on_shortcut and index.reaches(u, branch)]
    scope = common_prefix([p for p in map(module_path, mixing) if p])
    fork_shape = index.shape(fork)
    assert fork_shape is not None  # _not_a_join refuses a fork without a shape
    channel_dim = index.channel_dim(fork_shape, branch_nodes)
    site = ShiftSite(
        name=module_path(join) or scope or join.name, kind=kind, reason=reason,
        branch_consumers=tuple(u.name for u in on_branch),
        shortcut_consumers=tuple(u.name for u in on_shortcut),
        channels=int(fork_shape[channel_dim]) if len(fork_shape) > 1 else 0,
        channel_dim=channel_dim if channel_dim == 1 else -1,
        shape=fork_shape, branch_depth=deep, shortcut_depth=shallow, join=base["join"], fork=base["fork"],
    )
    return _Join(site, scope)


def _entry_site(entry: BlockEntry) -> ShiftSite:
    return ShiftSite(
        name=entry.block, kind="block_entry", join="", fork=entry.entry,
        branch_consumers=entry.first_readers, shortcut_consumers=entry.other_readers,
        channels=entry.channels, channel_dim=entry.channel_dim, shape=entry.shape,
        reason="no residual join in the network: the input of a block's first layers (no_residual='block_entry')",
    )


def _unique_names(joins: list[_Join]) -> list[ShiftSite]:
    """Names a join by the module whose forward adds; several joins in one module (a ViT block's
    attention and MLP residuals) by the module holding each branch's layers; ``#k`` otherwise."""
    counts: dict[str, int] = {}
    for join in joins:
        counts[join.site.name] = counts.get(join.site.name, 0) + 1
    sites = [site if counts[site.name] == 1 or not scope else replace(site, name=scope) for site, scope in joins]
    seen: dict[tuple[bool, str], int] = {}
    out = []
    for site in sites:  # shifted sites are numbered among themselves: other joins never rename them
        key = (site.kind in SHIFTED_KINDS, site.name)
        count = seen.get(key, 0)
        seen[key] = count + 1
        out.append(replace(site, name=f"{site.name}#{count + 1}") if count else site)
    return out


def classify_joins(index: GraphIndex) -> list[ShiftSite]:
    """Every addition of ``index``'s graph, classified; the no-residual entries when no join is residual."""
    joins: list[_Join] = []
    kinds: dict[fx.Node, SiteKind] = {}
    for node in index.nodes:
        join = _classify(index, node, kinds) if is_add(node) else None
        if join is not None:
            joins.append(join)
            kinds[node] = join.site.kind
    if not any(j.site.kind == "residual" for j in joins):
        joins += [_Join(_entry_site(e)) for e in block_entries(index)]
    return _unique_names(joins)


def default_example_input(model: nn.Module) -> torch.Tensor:
    """One image of the size the model was built for (timm's ``pretrained_cfg``) or 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_floating_point():
        return torch.randn((1, *size), device=param.device, dtype=param.dtype)
    return torch.randn((1, *size))


def analyse_graph(root: nn.Module, graph: fx.Graph,
                  example_input: torch.Tensor) -> tuple[GraphIndex, list[ShiftSite]]:
    """Records shapes through ``graph`` (with ``root`` in eval mode) and classifies every addition.

    Nothing is written to ``graph`` or ``root``; ``root``'s train/eval mode is restored. The
    returned index also holds the run's aliases and in-place writes (see ``_aliasing``).
    """
    gm = fx.GraphModule(root, graph)
    was_training = root.training
    gm.eval()
    try:
        with torch.no_grad():
            recording = record(gm, example_input)
    except Exception as err:
        raise ValueError(
            f"running the traced graph on an example input of shape {tuple(example_input.shape)} failed: "
            f"{type(err).__name__}: {err}\nHint: pass example_input= with a shape the model accepts "
            "(one image, e.g. torch.randn(1, 3, 224, 224))."
        ) from err
    finally:
        root.train(was_training)
    batch = int(example_input.shape[0]) if example_input.dim() else None
    index = GraphIndex(gm.graph, dict(gm.named_modules()), recording, batch)
    return index, classify_joins(index)


def find_residual_sites(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    all_joins: bool = False,
    train: bool = False,
) -> list[ShiftSite]:
    """Lists the residual joins ``convert`` would shift, without changing anything.

    The model is deep-copied, traced with ``torch.fx`` (honouring the leaf registry and timm's
    when timm is loaded) and run once on ``example_input`` to learn shapes.

    Args:
        model: a 2D network taking images ``(B, C, H, W)``.
        example_input: one input batch; defaults to one random image of the model's input size.
        leaf_modules: module classes or paths to keep as single nodes (see "When tracing fails").
        all_joins: also return the additions that are not shifted, with ``kind`` and ``reason``.
        train: analyse the train-mode graph instead of the eval-mode one.

    Returns:
        One :class:`ShiftSite` per join, in graph order.

    Example:
        >>> import torchvision
        >>> sites = find_residual_sites(torchvision.models.resnet18())
        >>> len(sites), sites[0].name, sites[0].channels
        (8, 'layer1.0', 64)

    When tracing fails:
        A :class:`TraceError` names the module that could not be traced; pass it in
        ``leaf_modules`` (its internals then stay unshifted) or register it once with
        :func:`register_leaf_module`.
    """
    model = copy.deepcopy(model)
    model.train(train)
    example_input = default_example_input(model) if example_input is None else example_input
    graph = trace(model, leaf_modules, example_input)
    _, sites = analyse_graph(model, graph, example_input)
    return sites if all_joins else [s for s in sites if s.kind == "residual"]


def site_table(sites: Sequence[ShiftSite]) -> str:
    """A plain-text table of sites, one row each."""
    rows = [("#", "site", "kind", "channels", "dim", "depth", "shape")]
    for i, s in enumerate(sites):
        rows.append((str(i), s.name, s.kind, str(s.channels), str(s.channel_dim),
                     f"{s.branch_depth}/{s.shortcut_depth}", "x".join(map(str, s.shape))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def __getattr__(name: str):
    if name == "ResidualSite":  # the 0.1 name, kept for one release (networks pickled by 0.1 refer to it)
        warnings.warn("ResidualSite is deprecated; use tsm_surgery.ShiftSite (the same class).",
                      DeprecationWarning, stacklevel=2)
        return ShiftSite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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

Networks without any residual join (VGG, DenseNet, Inception) get ``first_conv`` entries
instead: the tensor entering the first layer(s) of each block, shifted only on request.
"""

import copy
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from ._tracer import LeafSpec, trace

__all__ = ["ResidualSite", "find_residual_sites", "site_table"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_MIXING_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.linear, F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.mm, torch.bmm,
    torch.einsum, torch.addmm, torch.baddbmm,
}
_MIXING_METHODS = {"matmul", "mm", "bmm"}


@dataclass(frozen=True)
class ResidualSite:
    """One addition in the traced network, and for residual joins what ``convert`` would shift.

    Attributes:
        name: stable name built from module paths, e.g. ``"layer2.1"`` or ``"blocks.0.attn"``.
        kind: ``"residual"`` (shifted), ``"multi_branch"``, ``"internal"``, ``"broadcast"``, or
            ``"first_conv"`` (the entry of a block in a network without residual joins, shifted
            only with ``convert(..., no_residual="first_conv")``).
        join: graph node name of the addition.
        fork: graph node name of the tensor the residual branch starts from.
        branch_consumers: nodes reading ``fork`` on the branch side (rewired to the shifted tensor).
        shortcut_consumers: nodes reading ``fork`` on the shortcut side (left alone).
        channels: channel count of ``fork``.
        channel_dim: the dimension of ``fork`` holding channels (1 for NCHW, -1 for NHWC/tokens).
        shape: shape of ``fork`` for the example input.
        branch_depth: mixing layers on the branch; shortcut_depth likewise on the shortcut.
        reason: for joins that are not shifted, why.
    """

    name: str
    kind: str
    join: str
    fork: str
    branch_consumers: Tuple[str, ...] = ()
    shortcut_consumers: Tuple[str, ...] = ()
    channels: int = 0
    channel_dim: int = 1
    shape: Tuple[int, ...] = ()
    branch_depth: int = 0
    shortcut_depth: int = 0
    reason: str = field(default="", compare=False)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _ADD_METHODS


def _is_mixing(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return any(p.dim() >= 2 for p in modules[node.target].parameters())
    if node.op == "call_function":
        return node.target in _MIXING_FUNCTIONS
    return node.op == "call_method" and node.target in _MIXING_METHODS


_LAYER_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear}


def _is_layer(node: fx.Node) -> bool:
    """A parametrised layer (a module with weights, or a functional conv/linear), not a product of activations."""
    return node.op == "call_module" or (node.op == "call_function" and node.target in _LAYER_FUNCTIONS)


def _tensor_shape(node) -> Optional[Tuple[int, ...]]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _module_path(node: fx.Node) -> Optional[str]:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return None


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return ".".join(prefix)


class _GraphIndex:
    """Topological positions, ancestor bitsets and input-dependence of every node."""

    def __init__(self, graph: fx.Graph, modules: Dict[str, nn.Module]):
        self.nodes = list(graph.nodes)
        self.modules = modules
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.ancestors: Dict[fx.Node, int] = {}
        self.from_input: Dict[fx.Node, bool] = {}
        self.branch_scope: Dict[str, str] = {}  # join name -> common module path of its branch layers
        self.batch: Optional[int] = None  # the example input's batch size; frames live in that dim
        for node in self.nodes:
            bits = 0
            data = node.op == "placeholder"
            for inp in node.all_input_nodes:
                bits |= self.ancestors[inp] | (1 << self.position[inp])
                data = data or self.from_input[inp]
            self.ancestors[node] = bits
            self.from_input[node] = data

    def reaches(self, source: fx.Node, target: fx.Node) -> bool:
        """True when ``target`` is ``source`` or depends on it."""
        return source is target or bool(self.ancestors[target] >> self.position[source] & 1)

    def fork(self, a: fx.Node, b: fx.Node) -> Optional[fx.Node]:
        common = (self.ancestors[a] | 1 << self.position[a]) & (self.ancestors[b] | 1 << self.position[b])
        return self.nodes[common.bit_length() - 1] if common else None

    def depth(self, fork: fx.Node, end: fx.Node) -> int:
        """Most mixing layers on any path from ``fork`` to ``end``."""
        depth = {fork: 0}
        for node in self.nodes[self.position[fork] + 1: self.position[end] + 1]:
            inputs = [depth[i] for i in node.all_input_nodes if i in depth]
            if inputs and self.reaches(node, end):
                depth[node] = max(inputs) + _is_mixing(node, self.modules)
        return depth.get(end, 0)

    def branch_nodes(self, fork: fx.Node, end: fx.Node) -> List[fx.Node]:
        lo, hi = self.position[fork], self.position[end]
        return [n for n in self.nodes[lo + 1: hi + 1] if self.reaches(fork, n) and self.reaches(n, end)]


def _first_layer_channels(index: _GraphIndex, branch: List[fx.Node]) -> Optional[Tuple[int, bool]]:
    """Input channels of the first parametrised module on the branch, and whether it reads the last dim."""
    for node in branch:
        if node.op != "call_module":
            continue
        module = index.modules[node.target]
        for attr in ("in_channels", "in_features", "num_features", "normalized_shape"):
            value = getattr(module, attr, None)
            if value is not None:
                value = value[-1] if isinstance(value, (tuple, list)) else value
                return int(value), isinstance(module, (nn.Linear, nn.LayerNorm))
    return None


def _channel_dim(shape: Tuple[int, ...], first_layer: Optional[Tuple[int, bool]]) -> int:
    """The dim the branch's first layer reads channels from: 1 (NCHW) or -1 (NHWC, tokens)."""
    default = -1 if len(shape) == 3 else 1
    if first_layer is None or len(shape) < 3:
        return default
    channels, reads_last = first_layer
    if shape[1] == channels and not (reads_last and shape[-1] == channels):
        return 1
    if shape[-1] == channels:
        return -1
    return default


def _classify(index: _GraphIndex, join: fx.Node) -> Optional[ResidualSite]:
    operands = [a for a in join.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or any(_tensor_shape(a) is None for a in operands):
        return None  # scalar additions and non-tensor values are not joins
    a, b = operands
    shapes = {_tensor_shape(a), _tensor_shape(b)}
    fork = index.fork(a, b)
    base = dict(join=join.name, fork=fork.name if fork is not None else "")
    if not (index.from_input[a] and index.from_input[b]):
        return ResidualSite(name=join.name, kind="broadcast", reason="one operand does not come from the input (a parameter or constant)", **base)
    if len(shapes) != 1:
        return ResidualSite(name=join.name, kind="broadcast", reason=f"operands of different shapes {sorted(shapes)}", **base)
    fork_shape = _tensor_shape(fork) if fork is not None else None
    if fork_shape is None:
        return ResidualSite(name=join.name, kind="internal", reason="the operands do not fork from one tensor", **base)
    join_shape = _tensor_shape(a)
    if len(fork_shape) != len(join_shape):
        return ResidualSite(name=join.name, kind="internal", reason=f"the sum has rank {len(join_shape)} but its fork "
                            f"rank {len(fork_shape)}: a sum inside a layer (split heads), not a block residual", **base)
    if index.batch is not None and fork_shape[0] != index.batch:
        return ResidualSite(name=join.name, kind="internal", reason=f"the fork's leading dim {fork_shape[0]} is not the "
                            f"batch {index.batch}: it folds windows or patches into the batch, not frames", **base)
    depth_a, depth_b = index.depth(fork, a), index.depth(fork, b)
    branch, shortcut = (a, b) if depth_a >= depth_b else (b, a)
    deep, shallow = max(depth_a, depth_b), min(depth_a, depth_b)
    multi = any(_is_add(x) and x.meta.get("tsm_kind") == "multi_branch" for x in operands)
    if deep >= 2 and shallow <= 1:
        kind, reason = "residual", ""
    elif deep == 1 and shallow == 0 and shortcut is fork and not multi:
        kind, reason = "residual", ""  # one layer wrapped in an identity residual (ConvMixer, conv position encodings)
    elif deep == 1 and shallow <= 1 or multi:
        kind, reason = "multi_branch", "parallel single-layer branches (re-parameterisable sum), not a block residual"
    else:
        kind, reason = "internal", f"mixing depths {deep} and {shallow}: a sum inside a block, not a residual join"
    branch_nodes = index.branch_nodes(fork, branch)
    first_mixing = next((n for n in branch_nodes if _is_mixing(n, index.modules)), None)
    if kind == "residual" and first_mixing is not None and not _is_layer(first_mixing):
        kind, reason = "internal", ("the branch starts with a product of activations (q @ k inside attention), "
                                    "not a layer: a sum inside a layer, not a block residual")
    join.meta["tsm_kind"] = kind
    consumers = list(fork.users)
    on_shortcut = [u for u in consumers if index.reaches(u, shortcut) or u is join]
    on_branch = [u for u in consumers if u not in on_shortcut and index.reaches(u, branch)]
    mixing_paths = [_module_path(n) for n in branch_nodes if _is_mixing(n, index.modules)]
    branch_scope = _common_prefix([p for p in mixing_paths if p])
    name = _module_path(join) or branch_scope or join.name
    index.branch_scope[join.name] = branch_scope
    channel_dim = _channel_dim(fork_shape, _first_layer_channels(index, branch_nodes))
    return ResidualSite(
        name=name, kind=kind, reason=reason,
        branch_consumers=tuple(u.name for u in on_branch),
        shortcut_consumers=tuple(u.name for u in on_shortcut),
        channels=int(fork_shape[channel_dim]) if len(fork_shape) > 1 else 0,
        channel_dim=channel_dim if channel_dim == 1 else -1,
        shape=fork_shape, branch_depth=deep, shortcut_depth=shallow, **base,
    )


_FLAT_SEQUENCE = 4  # a module with this many mixing layers as direct children is a plain layer stack


def _mixing_owner(node: fx.Node) -> str:
    """The module a mixing node belongs to: the layer itself (``features.3``) or, for a functional
    call, the innermost module whose forward made it (timm's ``StdConv2d`` -> its path)."""
    return _module_path(node) or ""


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _inside(path: Optional[str], block: str) -> bool:
    return path is not None and (block == "" or path == block or path.startswith(block + "."))


def _first_conv_entries(index: _GraphIndex) -> List[ResidualSite]:
    """The no-residual policy: one site per block, shifting the tensor that enters its first layers.

    A *block* is the innermost module holding two or more mixing layers (DenseNet's dense
    layer, an Inception branch, LCNet's depthwise-separable block); in a plain stack of layers
    (a module with four or more mixing layers as direct children, such as VGG's ``features``)
    every layer is its own block. A block's *first* layers are its mixing layers that no other
    mixing layer of the block precedes. From each first layer we walk back through the block's
    single-input, non-mixing ops (norm, activation, pooling) to the tensor that enters the
    block, and shift that tensor for those consumers only. Sibling blocks entered by the same
    tensor (an Inception module's parallel branches) share one site, named after the module
    they all sit in; a block on another path (an auxiliary head) gets its own. Tensors no
    mixing layer has touched yet (the image) and tensors without spatial or token dimensions
    (pooled features entering a classifier) are not shifted.
    """
    mixing = [n for n in index.nodes if _is_mixing(n, index.modules) and n.all_input_nodes]
    owners = {n: _mixing_owner(n) for n in mixing}
    under: Dict[str, set] = {}
    children: Dict[str, int] = {}
    for owner in set(owners.values()):
        parts = owner.split(".") if owner else []
        for k in range(len(parts)):
            under.setdefault(".".join(parts[:k]), set()).add(owner)
        children[_parent(owner)] = children.get(_parent(owner), 0) + 1

    def block_of(owner: str) -> str:
        path = _parent(owner) if owner else ""
        while path and len(under.get(path, ())) < 2:
            path = _parent(path)
        return owner if not path or children.get(path, 0) >= _FLAT_SEQUENCE else path

    blocks: Dict[str, List[fx.Node]] = {}
    for node in mixing:
        blocks.setdefault(block_of(owners[node]), []).append(node)
    mixing_bits = 0
    for node in mixing:
        mixing_bits |= 1 << index.position[node]
    entries: Dict[Tuple[str, fx.Node], List[fx.Node]] = {}
    entry_blocks: Dict[Tuple[str, fx.Node], List[str]] = {}
    for block, nodes in blocks.items():
        for node in nodes:
            if any(index.reaches(other, node) for other in nodes if other is not node):
                continue  # not a first layer of its block
            consumer, data = node, node.all_input_nodes[0]
            while (data.op != "placeholder" and len(data.all_input_nodes) == 1 and len(data.users) == 1
                   and not _is_mixing(data, index.modules) and _inside(_module_path(data), block)):
                consumer, data = data, data.all_input_nodes[0]
            shape = _tensor_shape(data)
            if shape is None or len(shape) < 3 or not (index.ancestors[data] | 1 << index.position[data]) & mixing_bits:
                continue
            if index.batch is not None and shape[0] != index.batch:
                continue  # windows or patches folded into the batch: not one entry per frame
            per_sample = 1
            for size in shape[1:]:
                per_sample *= size
            if per_sample in shape[1:]:
                continue  # pooled features (a squeeze-excite input, a head): no spatial or token extent
            key = block
            if not _inside(_module_path(data), block):  # climb to the outermost module data enters
                while key and _parent(key) and not _inside(_module_path(data), _parent(key)):
                    key = _parent(key)
            entries.setdefault((key, data), [])
            entry_blocks.setdefault((key, data), []).append(block)
            if consumer not in entries[(key, data)]:
                entries[(key, data)].append(consumer)
    sites = []
    for (key, data), firsts in entries.items():
        block = _common_prefix(entry_blocks[(key, data)]) if len(entry_blocks[(key, data)]) > 1 else entry_blocks[(key, data)][0]
        shape = _tensor_shape(data)
        layers = [n for n in mixing if any(index.reaches(f, n) for f in firsts)][:1]
        channel_dim = _channel_dim(shape, _first_layer_channels(index, layers))
        sites.append(ResidualSite(
            name=block or data.name, kind="first_conv", join=firsts[0].name, fork=data.name,
            branch_consumers=tuple(n.name for n in firsts),
            shortcut_consumers=tuple(u.name for u in data.users if u not in firsts),
            channels=int(shape[channel_dim]), channel_dim=channel_dim if channel_dim == 1 else -1, shape=shape,
            reason="no residual join in the network: the input of a block's first layers (no_residual='first_conv')",
        ))
    order = {node.name: index.position[node] for node in index.nodes}
    return sorted(sites, key=lambda site: order[site.fork])


def _unique_names(sites: List[ResidualSite], branch_scope: Dict[str, str]) -> List[ResidualSite]:
    """Names a join by the module whose forward adds; several joins in one module (a ViT block's
    attention and MLP residuals) by the module holding each branch's layers; ``#k`` otherwise."""
    counts: Dict[str, int] = {}
    for site in sites:
        counts[site.name] = counts.get(site.name, 0) + 1
    sites = [site if counts[site.name] == 1 or not branch_scope.get(site.join)
             else ResidualSite(**{**site.__dict__, "name": branch_scope[site.join]}) for site in sites]
    seen: Dict[Tuple[bool, str], int] = {}
    out = []
    for site in sites:  # shifted sites are numbered among themselves: other joins never rename them
        key = (site.kind in ("residual", "first_conv"), site.name)
        count = seen.get(key, 0)
        seen[key] = count + 1
        if count:
            site = ResidualSite(**{**site.__dict__, "name": f"{site.name}#{count + 1}"})
        out.append(site)
    return out


def default_example_input(model: nn.Module) -> torch.Tensor:
    """One image of the size the model was built for (timm's ``pretrained_cfg``) or 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    param = next(iter(model.parameters()), None)
    kwargs = {"device": param.device, "dtype": param.dtype} if param is not None and param.is_floating_point() else {}
    return torch.randn((1,) + size, **kwargs)


def _propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Records every node's output shape, with fake tensors where they can follow the graph.

    Fake tensors carry shapes without computing (a ResNet-50 at 224 px: about 0.15 s instead of
    0.25-1.5 s); graphs whose ops need real values (``.item()``, ``nonzero``) run for real.
    """
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(example_input))
    except Exception:
        ShapeProp(gm).propagate(example_input)


def analyse_graph(root: nn.Module, graph: fx.Graph, example_input: torch.Tensor) -> Tuple[fx.GraphModule, List[ResidualSite]]:
    """Propagates shapes through ``graph`` (with ``root`` in eval mode) and classifies every addition."""
    gm = fx.GraphModule(root, graph)
    was_training = root.training
    gm.eval()
    try:
        with torch.no_grad():
            _propagate_shapes(gm, example_input)
    except Exception as err:
        raise ValueError(
            f"running the traced graph on an example input of shape {tuple(example_input.shape)} failed: "
            f"{type(err).__name__}: {err}\nHint: pass example_input= with a shape the model accepts "
            "(one image, e.g. torch.randn(1, 3, 224, 224))."
        ) from err
    finally:
        root.train(was_training)
    index = _GraphIndex(gm.graph, dict(gm.named_modules()))
    index.batch = int(example_input.shape[0]) if example_input.dim() else None
    sites = [s for s in (_classify(index, n) for n in index.nodes if _is_add(n)) if s is not None]
    if not any(s.kind == "residual" for s in sites):
        sites += _first_conv_entries(index)
    return gm, _unique_names(sites, index.branch_scope)


def find_residual_sites(
    model: nn.Module,
    example_input: Optional[torch.Tensor] = None,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    all_joins: bool = False,
    train: bool = False,
) -> List[ResidualSite]:
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
        One :class:`ResidualSite` per join, in graph order.

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
    graph = trace(model, leaf_modules)
    example_input = default_example_input(model) if example_input is None else example_input
    _, sites = analyse_graph(model, graph, example_input)
    return sites if all_joins else [s for s in sites if s.kind == "residual"]


def site_table(sites: Sequence[ResidualSite]) -> str:
    """A plain-text table of sites, one row each."""
    rows = [("#", "site", "kind", "channels", "dim", "depth", "shape")]
    for i, s in enumerate(sites):
        rows.append((str(i), s.name, s.kind, str(s.channels), str(s.channel_dim),
                     f"{s.branch_depth}/{s.shortcut_depth}", "x".join(map(str, s.shape))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

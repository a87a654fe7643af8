"""What site analysis knows about a traced graph: node shapes, ancestry and the layer predicates.

Nothing here writes to the graph: shapes are recorded by a small interpreter into a dict, and
:class:`GraphIndex` is built once, complete, from the graph and those shapes.
"""

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

Shape = tuple[int, ...]
View = tuple[int, int, tuple[int, ...]] | None

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_LAYER_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear}
_MIXING_FUNCTIONS = _LAYER_FUNCTIONS | {
    F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.mm, torch.bmm,
    torch.einsum, torch.addmm, torch.baddbmm,
}
_MIXING_METHODS = {"matmul", "mm", "bmm"}


class Recording(NamedTuple):
    """What one run of a graph showed, per node.

    Attributes:
        shapes: the output's shape (``None`` for non-tensors).
        views: the output's (storage identity, offset, strides): equal storage identities mean
            aliases, equal views the very same tensor (an in-place op's result is its input).
        writes: the input nodes whose tensors the node changed in place (their version counter moved).
    """

    shapes: dict[fx.Node, Shape | None]
    views: dict[fx.Node, View]
    writes: dict[fx.Node, tuple[fx.Node, ...]]


class _Recorder(fx.Interpreter):
    """Runs a graph module and records each node's output shape, view and in-place writes.

    Unlike ``ShapeProp`` it prints nothing when a node fails: the caller decides what a
    failure means (the fake-tensor run falls back to a real one). Every value is kept until
    the run ends, so no storage is freed and reused: storage identities stay unique.
    """

    def __init__(self, gm: fx.GraphModule, fake_mode: FakeTensorMode | None = None):
        super().__init__(gm, garbage_collect_values=False)
        self.fake_mode = fake_mode
        self.recording = Recording({}, {}, {})

    def run_node(self, n: fx.Node):
        before = [(i, t, t._version) for i in n.all_input_nodes for t in tree_leaves(self.env.get(i))
                  if isinstance(t, torch.Tensor)]
        if self.fake_mode is None:
            result = super().run_node(n)
        else:
            from torch._dispatch.python import enable_python_dispatcher

            with self.fake_mode, enable_python_dispatcher():
                result = super().run_node(n)
        tensor = isinstance(result, torch.Tensor)
        self.recording.shapes[n] = tuple(int(d) for d in result.shape) if tensor else None
        self.recording.views[n] = _view(result) if tensor else None
        written = tuple(dict.fromkeys(i for i, t, version in before if t._version != version))
        if written:
            self.recording.writes[n] = written
        return result


def _view(t: torch.Tensor) -> View:
    try:
        return t.untyped_storage()._cdata, int(t.storage_offset()), tuple(int(s) for s in t.stride())
    except (RuntimeError, NotImplementedError):  # sparse and nested tensors: no single strided storage
        return None


def record(gm: fx.GraphModule, example_input: torch.Tensor) -> Recording:
    """Every node's output shape, view and in-place writes for ``example_input``, with fake tensors
    where they can follow the graph.

    Fake tensors carry shapes without computing (a ResNet-50 at 224 px: about 0.15 s instead of
    0.25-1.5 s); graphs whose ops need real values (``.item()``, ``nonzero``) run for real.
    """
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        recorder = _Recorder(gm, mode)
        recorder.run(mode.from_tensor(example_input))
    except Exception:
        recorder = _Recorder(gm)
        recorder.run(example_input)
    return recorder.recording


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _ADD_METHODS


def is_layer(node: fx.Node) -> bool:
    """A parametrised layer (a module with weights, or a functional conv/linear), not a product of activations."""
    return node.op == "call_module" or (node.op == "call_function" and node.target in _LAYER_FUNCTIONS)


def module_path(node: fx.Node) -> str | None:
    """The module a node belongs to: a called module's path, else the innermost module whose forward made it."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return None


def common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return ".".join(prefix)


class GraphIndex:
    """Topological positions, ancestor bitsets, input-dependence and shapes of every node.

    Args:
        graph: the traced graph.
        modules: its module paths -> modules.
        recording: from :func:`record`.
        batch: the example input's batch size; frames live in that dim (``None``: unknown).
    """

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], recording: Recording, batch: int | None):
        self.nodes = list(graph.nodes)
        self.modules = modules
        self.shapes, self.views, self.writes = recording
        self.batch = batch
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.ancestors: dict[fx.Node, int] = {}
        self.from_input: dict[fx.Node, bool] = {}
        for node in self.nodes:
            bits = 0
            data = node.op == "placeholder"
            for inp in node.all_input_nodes:
                bits |= self.ancestors[inp] | (1 << self.position[inp])
                data = data or self.from_input[inp]
            self.ancestors[node] = bits
            self.from_input[node] = data

    def shape(self, node) -> Shape | None:
        return self.shapes.get(node) if isinstance(node, fx.Node) else None

    def is_mixing(self, node: fx.Node) -> bool:
        """Convolutions, linear layers and matrix products; norms, scales and activations are not."""
        if node.op == "call_module":
            return any(p.dim() >= 2 for p in self.modules[str(node.target)].parameters())
        if node.op == "call_function":
            return node.target in _MIXING_FUNCTIONS
        return node.op == "call_method" and node.target in _MIXING_METHODS

    def reaches(self, source: fx.Node, target: fx.Node) -> bool:
        """True when ``target`` is ``source`` or depends on it."""
        return source is target or bool(self.ancestors[target] >> self.position[source] & 1)

    def fork(self, a: fx.Node, b: fx.Node) -> fx.Node | None:
        """The latest node both ``a`` and ``b`` depend on."""
        common = (self.ancestors[a] | 1 << self.position[a]) & (self.ancestors[b] | 1 << self.position[b])
        return self.nodes[common.bit_length() - 1] if common else None

    def depth(self, fork: fx.Node, end: fx.Node) -> int:
        """Most mixing layers on any path from ``fork`` to ``end``."""
        depth = {fork: 0}
        for node in self.nodes[self.position[fork] + 1: self.position[end] + 1]:
            inputs = [depth[i] for i in node.all_input_nodes if i in depth]
            if inputs and self.reaches(node, end):
                depth[node] = max(inputs) + self.is_mixing(node)
        return depth.get(end, 0)

    def branch_nodes(self, fork: fx.Node, end: fx.Node) -> list[fx.Node]:
        lo, hi = self.position[fork], self.position[end]
        return [n for n in self.nodes[lo + 1: hi + 1] if self.reaches(fork, n) and self.reaches(n, end)]

    def channel_dim(self, shape: Shape, branch: Sequence[fx.Node]) -> int:
        """The dim the branch's first layer reads channels from: 1 (NCHW) or -1 (NHWC, tokens)."""
        default = -1 if len(shape) == 3 else 1
        first_layer = self._first_layer_channels(branch)
        if first_layer is None or len(shape) < 3:
            return default
        channels, reads_last = first_layer
        if shape[1] == channels and not (reads_last and shape[-1] == channels):
            return 1
        if shape[-1] == channels:
            return -1
        return default

    def _first_layer_channels(self, branch: Sequence[fx.Node]) -> tuple[int, bool] | None:
        """Input channels of the first parametrised module on the branch, and whether it reads the last dim."""
        for node in branch:
            if node.op != "call_module":
                continue
            module = self.modules[str(node.target)]
            for attr in ("in_channels", "in_features", "num_features", "normalized_shape"):
                value = getattr(module, attr, None)
                if value is not None:
                    value = value[-1] if isinstance(value, (tuple, list)) else value
                    return int(value), isinstance(module, (nn.Linear, nn.LayerNorm))
        return None

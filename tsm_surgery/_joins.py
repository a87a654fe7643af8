"""Residual joins that add into their left operand, as an eager ``out += identity`` does.

FX records ``out += identity`` as ``out + identity``, which allocates one more activation per
block than the 2D network it was traced from. Where ``out`` is a fresh layer output that nothing
else reads, :func:`_join_in_place` routes the sum to :func:`_join`, which writes it into ``out``.
The clip network's eval graph (``_fast_paths``) and the online graph (``_online_graph``) both do.
"""

import operator

from torch import Tensor, fx, nn

from ._recompute import in_graph_capture

__all__: list[str] = []


def _join(left: Tensor, right: Tensor) -> Tensor:
    """``left + right``, written into ``left`` when the result has its shape and dtype.

    :func:`_join_in_place` routes a sum here only when ``left`` is a fresh layer output (see
    :data:`_FRESH_OUTPUTS`) that nothing else reads and that its layer did not save for backward,
    so the sum is bit for bit that of ``left + right`` and nothing can tell ``left`` was reused.

    Example:
        >>> import torch
        >>> left = torch.ones(2)
        >>> _join(left, torch.ones(2)) is left          # the sum is written into left
        True
        >>> _join(left, torch.ones(3, 2)).shape         # a broadcast that does not fit makes a new tensor
        torch.Size([3, 2])
    """
    if isinstance(left, fx.Proxy):  # re-tracing a pickled graph: keep the node
        return left.tracer.create_proxy("call_function", _join, (left, right), {})
    if in_graph_capture():  # tracers and exporters record the plain sum (no shape test in the graph)
        return left + right
    if isinstance(right, Tensor) and right.shape == left.shape and right.dtype == left.dtype:
        return left.add_(right)
    return left + right


# Layers whose output is a new tensor that they do not keep for backward (convolution, linear
# and normalization layers save their input, not their output): a join may add into it.
_FRESH_OUTPUTS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _join_in_place(graph: fx.Graph, root: nn.Module) -> None:
    """Routes each ``left + right`` whose ``left`` is a fresh layer output read only there to :func:`_join`."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not operator.add or len(node.args) != 2 or node.kwargs:
            continue
        left, right = node.args
        if not isinstance(left, fx.Node) or not isinstance(right, fx.Node) or left is right or len(left.users) != 1:
            continue
        if left.op != "call_module":
            continue
        module = root.get_submodule(str(left.target))
        if isinstance(module, _FRESH_OUTPUTS) and not module._forward_hooks:
            node.target = _join

"""Temporal modules placed at the boundary of a named module in a converted network.

Three rules of MMAction2's stock TSM backbones are placements rather than residual sites:

* ``MobileOneTSM`` shifts the input of every block: its blocks sum parallel single-layer
  branches (no residual join), and a shift outside the block keeps it reparameterisable;
* ``ResNetTSM``'s non-local blocks run after chosen residual blocks, on ``(N, C, T, H, W)``;
* its temporal pooling halves ``T`` after the first stage.

The shifts are ``tsm_surgery.convert(..., shift_inputs=...)``; the two temporal modules here are
placed with :func:`tsm_surgery.insert_module`. The module paths come from the 2D network's own
tree, so the same rule holds for any network built that way.
"""


import torch
from torch import fx, nn

__all__ = ["TemporalMaxPool", "NonLocalTSM", "downstream_targets", "temporal_modules"]


def _frames(x: torch.Tensor, n_segments: int, name: str) -> int:
    if x.shape[0] % n_segments:
        raise ValueError(f"{name} got {x.shape[0]} frames, not a multiple of n_segments={n_segments}.")
    return x.shape[0] // n_segments


class TemporalMaxPool(nn.Module):
    """Max pooling over time (kernel 3, stride 2, padding 1): ``T`` frames in, ``T // 2`` out.

    Runs on folded clips ``(N*T, C, H, W)``, like ResNetTSM's ``temporal_pool``; ``T`` must be even.
    """

    def __init__(self, n_segments: int):
        super().__init__()
        self.n_segments = int(n_segments)
        self.pool = nn.MaxPool3d(kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.n_segments
        if t % 2:
            raise ValueError(f"temporal_pool halves the frames of a clip and needs an even num_segments, got {t}.")
        n = _frames(x, t, "temporal_pool")
        c, h, w = x.shape[1:]
        v = self.pool(x.view(n, t, c, h, w).transpose(1, 2))
        return v.transpose(1, 2).reshape(n * (t // 2), c, h, w)

    def extra_repr(self) -> str:
        return f"n_segments={self.n_segments}"


def NonLocalTSM(in_channels: int, n_segments: int, **cfg) -> nn.Module:
    """mmcv's ``NonLocal3d`` run on folded clips ``(N*T, C, H, W)`` as ``(N, C, T, H, W)`` volumes.

    Its parameters have ``NonLocal3d``'s own names, so ResNetTSM's ``non_local_block`` keys load.
    """
    from mmcv.cnn import NonLocal3d

    class _NonLocalTSM(NonLocal3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.n_segments
            n = _frames(x, t, "non_local")
            c, h, w = x.shape[1:]
            v = super().forward(x.view(n, t, c, h, w).transpose(1, 2).contiguous())
            return v.transpose(1, 2).reshape(n * t, c, h, w)

    _NonLocalTSM.__name__ = _NonLocalTSM.__qualname__ = "NonLocalTSM"
    module = _NonLocalTSM(in_channels, **cfg)
    module.n_segments = int(n_segments)
    return module


def downstream_targets(graph: fx.Graph, target: str) -> list[str]:
    """Targets of the ``call_module`` nodes that depend on the call of ``target`` (not itself)."""
    start = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    seen, stack = set(start), list(start)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return [str(n.target) for n in graph.nodes if n in seen and n.op == "call_module" and n.target != target]


def temporal_modules(net: nn.Module) -> list[nn.Module]:
    """Every module of ``net`` with an ``n_segments`` setting, in registration order."""
    return [m for m in net.modules() if isinstance(getattr(m, "n_segments", None), int)]

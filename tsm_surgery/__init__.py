"""Temporal Shift Module as model surgery.

``convert`` traces a 2D image network with ``torch.fx``, finds its residual branches and
inserts a temporal shift where each branch starts; ``find_residual_sites`` shows what it
would shift before anything changes.

Example:
    >>> import torch, torchvision, tsm_surgery
    >>> model = torchvision.models.resnet18()
    >>> [s.name for s in tsm_surgery.find_residual_sites(model)][:3]
    ['layer1.0', 'layer1.1', 'layer2.0']
    >>> net = tsm_surgery.convert(model, n_segments=8)
    >>> net(torch.randn(8, 3, 64, 64)).shape      # one clip of 8 frames
    torch.Size([8, 1000])
"""

from . import _sites
from ._boundary import insert_module
from ._convert import TSMNet, convert
from ._online import OnlineTSM, to_online
from ._shift import TemporalShift, temporal_shift
from ._sites import ShiftSite, find_residual_sites, site_table
from ._tracer import TraceError, leaf_modules, notrace_functions, register_leaf_module, register_notrace_function

__all__ = [
    "convert",
    "insert_module",
    "find_residual_sites",
    "site_table",
    "temporal_shift",
    "TemporalShift",
    "TSMNet",
    "ShiftSite",
    "TraceError",
    "register_leaf_module",
    "register_notrace_function",
    "leaf_modules",
    "notrace_functions",
    "to_online",
    "OnlineTSM",
]


def __getattr__(name: str):
    return _sites.__getattr__(name)  # deprecated 0.1 names

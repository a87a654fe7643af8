"""ONNX target of ``tsm-surgery export``: a TSM network as an ONNX graph (onnxruntime runs it).

Two forms:

* ``--online`` (default): the explicit-state step of :func:`tsm_surgery.to_online`. Inputs are
  ``frames`` ``(B, C, H, W)`` and one cache per shift site; outputs are ``output`` and the new
  caches. Feed each output cache back as the matching input at the next frame; start from
  zeros. The sidecar lists the pairs (``state``) with their shapes.
* ``--offline``: the converted clip network, input ``clips`` ``(N*T, C, H, W)`` with ``T`` fixed
  and the number of clips ``N`` dynamic.

Example::

    tsm-surgery export --model timm:mobilenetv2_100 --online --size 224 --output mbv2_online.onnx
    tsm-surgery export --model timm:resnet50 --offline --n-segments 8 --checkpoint tsn_r50.pth
"""

import warnings
from typing import Any

import torch
from torch import nn

import tsm_surgery

from .artifacts import offline_example, offline_io, online_example, online_io, require, sidecar_path

__all__ = ["export_online", "export_offline", "output_files", "write"]


def write(module: nn.Module, args: tuple, path: str, input_names: list[str], output_names: list[str],
          exporter: str = "dynamo", dynamic: dict[str, Any] | None = None) -> None:
    """Writes ``module`` traced on ``args`` as ONNX; ``dynamic`` maps an input name to {dim: (name, multiple)}."""
    require("onnx", "onnx")
    _export_onnx(module, args, path, input_names, output_names, exporter, dynamic)


def _export_onnx(module: nn.Module, args: tuple, path: str, input_names: list[str], output_names: list[str],
                 exporter: str, dynamic: dict[str, Any] | None = None) -> None:
    """One call into torch.onnx for both exporters."""
    kwargs: dict[str, Any] = dict(input_names=input_names, output_names=output_names)
    if exporter == "dynamo":
        if dynamic:
            shapes = []
            for name in input_names:
                dims = {}
                for dim, (dim_name, multiple) in dynamic.get(name, {}).items():
                    dims[dim] = multiple * torch.export.Dim(dim_name, min=1, max=4096)
                shapes.append(dims or None)
            kwargs["dynamic_shapes"] = tuple(shapes)
        with torch.no_grad():
            torch.onnx.export(module, args, path, dynamo=True, verbose=False, **kwargs)
    elif exporter == "legacy":
        if dynamic:
            axes = {name: {dim: dim_name for dim, (dim_name, _) in dims.items()} for name, dims in dynamic.items()}
            axes.update({name: {0: "batch"} for name in output_names})
            kwargs["dynamic_axes"] = axes
        with warnings.catch_warnings():
            # Chosen explicitly with --exporter legacy; torch's advice to use the default is moot here.
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                                    DeprecationWarning)
            with torch.no_grad():
                torch.onnx.export(module, args, path, dynamo=False, **kwargs)
    else:
        raise ValueError(f"exporter={exporter!r}: use 'dynamo' (torch.export based) or 'legacy' (TorchScript based).")


def export_online(online: "tsm_surgery.OnlineTSM", path: str, batch_size: int = 1,
                  frame_shape: tuple[int, int, int] = (3, 224, 224), exporter: str = "dynamo") -> dict[str, Any]:
    """Exports the explicit-state step of ``online`` to ONNX; returns the sidecar's ``inputs``/``outputs``/``state``.

    Input names are ``frames`` and ``cache_<i>``, output names ``output`` and ``new_cache_<i>``,
    ``i`` in ``online.state_names`` order; the sidecar's ``state`` maps each site to its pair.
    """
    frames, state, out = online_example(online, batch_size, frame_shape)
    io = online_io(frames, state, out)
    write(online.step_module, (frames, *state.values()), path, [i["name"] for i in io["inputs"]],
          [o["name"] for o in io["outputs"]], exporter=exporter)
    return io


def export_offline(net: "tsm_surgery.TSMNet", path: str, frame_shape: tuple[int, int, int] = (3, 224, 224),
                   exporter: str = "dynamo") -> dict[str, Any]:
    """Exports the clip network with a dynamic number of clips (batch ``N*T``, ``T`` fixed).

    Returns the sidecar's ``inputs``/``outputs``/``state``.
    """
    segments = net.n_segments
    clips, out = offline_example(net, frame_shape, clips=2)
    write(net, (clips,), path, ["clips"], ["output"], exporter=exporter, dynamic={"clips": {0: ("clips", segments)}})
    return offline_io(clips, out, segments, dynamic=True)


def output_files(path: str) -> list[tuple[str, str]]:
    """``(path, role)`` of every file ``export`` writes for ONNX path ``path``.

    The dynamo exporter stores the weights next to the graph in ``<path>.data``; the sidecar is
    ``path`` with ``.json``. A ``path`` ending in ``.json`` would put the sidecar on the graph.
    """
    side = sidecar_path(path, "the ONNX graph")
    return [(path, "the ONNX graph"), (path + ".data", "its weights, written by the dynamo exporter"),
            (side, "the JSON sidecar naming inputs, outputs and caches")]

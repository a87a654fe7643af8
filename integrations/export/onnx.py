"""``tsm-surgery export``: write a TSM network as ONNX plus a JSON sidecar.

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

import argparse
import json
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import tsm_surgery
from tsm_surgery.cli import positive_int
from tsm_surgery.integrations.checkpoints import check_checkpoint_layout, shift_for_checkpoint
from tsm_surgery.integrations.checkpoints.loading import cli_log
from tsm_surgery.integrations.models import build_model, default_frame_size
from tsm_surgery.integrations.outputs import claim_outputs

__all__ = ["export_online", "export_offline", "output_files", "SIDECAR_FORMAT"]

SIDECAR_FORMAT = "tsm_surgery.onnx/1"


def _export_onnx(module: nn.Module, args: Tuple, path: str, input_names: List[str], output_names: List[str],
                 exporter: str, dynamic: Optional[Dict[str, Any]] = None) -> None:
    """One call into torch.onnx for both exporters; ``dynamic`` maps an input name to {dim: (name, multiple)}."""
    kwargs: Dict[str, Any] = dict(input_names=input_names, output_names=output_names)
    if exporter == "dynamo":
        if dynamic:
            shapes = []
            for name in input_names:
                dims = {}
                for dim, (dim_name, multiple) in dynamic.get(name, {}).items():
                    dims[dim] = multiple * torch.export.Dim(dim_name, min=1, max=4096)
                shapes.append(dims or None)
            kwargs["dynamic_shapes"] = tuple(shapes)
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
            torch.onnx.export(module, args, path, dynamo=False, **kwargs)
    else:
        raise ValueError(f"exporter={exporter!r}: use 'dynamo' (torch.export based) or 'legacy' (TorchScript based).")


def _spec(name: str, t: torch.Tensor, **extra) -> Dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), **extra}


def export_online(online: "tsm_surgery.OnlineTSM", path: str, batch_size: int = 1,
                  frame_shape: Tuple[int, int, int] = (3, 224, 224), exporter: str = "dynamo") -> Dict[str, Any]:
    """Exports the explicit-state step of ``online`` to ONNX; returns the sidecar dict.

    Input names are ``frames`` and ``cache_<i>``, output names ``output`` and ``new_cache_<i>``,
    ``i`` in ``online.state_names`` order; the sidecar's ``state`` maps each site to its pair.
    """
    online.eval()
    state = online.init_state(batch_size, frame_shape=frame_shape)
    first = next(iter(state.values()))
    frames = torch.zeros((batch_size,) + tuple(frame_shape), dtype=first.dtype, device=first.device)
    cache_in = [f"cache_{i}" for i in range(len(state))]
    cache_out = [f"new_cache_{i}" for i in range(len(state))]
    with torch.no_grad():
        out, _ = online.step(frames, state)
        _export_onnx(online.step_module, (frames, *state.values()), path, ["frames", *cache_in],
                     ["output", *cache_out], exporter)
    return {
        "inputs": [_spec("frames", frames)] + [_spec(n, c, site=s) for n, c, s in zip(cache_in, state.values(), state)],
        "outputs": [_spec("output", out)] + [_spec(n, c, site=s) for n, c, s in zip(cache_out, state.values(), state)],
        "state": [{"site": s, "input": i, "output": o, "shape": list(c.shape),
                   "dtype": str(c.dtype).replace("torch.", ""), "init": "zeros"}
                  for s, i, o, c in zip(state, cache_in, cache_out, state.values())],
    }


def export_offline(net: "tsm_surgery.TSMNet", path: str, frame_shape: Tuple[int, int, int] = (3, 224, 224),
                   exporter: str = "dynamo") -> Dict[str, Any]:
    """Exports the clip network with a dynamic number of clips (batch ``N*T``, ``T`` fixed).

    Returns the sidecar dict.
    """
    net.eval()
    segments = net.n_segments
    param = next(net.parameters())  # a model on CUDA exports from CUDA inputs
    clips = torch.zeros((2 * segments,) + tuple(frame_shape), dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = net(clips)
        _export_onnx(net, (clips,), path, ["clips"], ["output"], exporter, dynamic={"clips": {0: ("clips", segments)}})
    batch = f"N*{segments}"
    return {
        "inputs": [dict(_spec("clips", clips), shape=[batch] + list(clips.shape[1:]))],
        "outputs": [dict(_spec("output", out), shape=[batch] + list(out.shape[1:]))],
        "state": [],
    }


def output_files(path: str) -> List[Tuple[str, str]]:
    """``(path, role)`` of every file ``export`` writes for ONNX path ``path``.

    The dynamo exporter stores the weights next to the graph in ``<path>.data``; the sidecar is
    ``path`` with ``.json``. A ``path`` ending in ``.json`` would put the sidecar on the graph.
    """
    side = os.path.splitext(path)[0] + ".json"
    if os.path.abspath(side) == os.path.abspath(path):
        raise ValueError(f"--output {path}: the JSON sidecar is the ONNX path with .json, so it would overwrite "
                         "the ONNX graph; name the graph *.onnx.")
    return [(path, "the ONNX graph"), (path + ".data", "its weights, written by the dynamo exporter"),
            (side, "the JSON sidecar naming inputs, outputs and caches")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="timm:NAME or torchvision:NAME (random weights unless --checkpoint)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--online", dest="online", action="store_true", default=True,
                      help="export the one-frame step with explicit caches (default; direction uni)")
    form.add_argument("--offline", dest="online", action="store_false",
                      help="export the clip network, input (N*T, C, H, W) with N dynamic")
    parser.add_argument("--n-segments", type=positive_int, default=8, help="frames per clip T (offline; default 8)")
    parser.add_argument("--shift-div", type=positive_int, default=8,
                        help="1/shift_div of the channels move (default 8)")
    parser.add_argument("--direction", choices=("bi", "uni"),
                        help="offline only; default bi (online is always uni)")
    parser.add_argument("--uni-slot", choices=("past", "first"),
                        help="with a uni shift: channels read from the previous frame: 'past' = [fold, 2*fold) "
                             "(default), 'first' = [0, fold) as the paper's online demo (default for its checkpoint)")
    parser.add_argument("--checkpoint", help="2D or converted state_dict, loaded with weights_only=True")
    parser.add_argument("--num-classes", type=positive_int, help="classifier size (default: the model's own)")
    parser.add_argument("--size", type=positive_int, help="frame height and width (default: the model's input size)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="streams per step (online; default 1)")
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                        help="torch.onnx exporter: dynamo (torch.export based, default) or legacy (TorchScript)")
    parser.add_argument("--output", help="ONNX path (default: <model>_<online|offline>.onnx); the weights go to "
                        "<output>.data (dynamo exporter) and the sidecar to the same path with .json")
    parser.add_argument("--force", action="store_true", help="replace existing output files (all of them)")


def run(args: argparse.Namespace) -> int:
    if args.uni_slot and (args.direction == "bi" or (not args.online and args.direction is None)):
        raise ValueError("--uni-slot applies to a uni shift: use it with --online or --direction uni.")
    if args.online and args.direction == "bi":
        raise ValueError("--direction bi: --online needs the uni-directional shift (a bi network reads "
                         "future frames); drop --direction bi or use --offline.")
    direction = "uni" if args.online else (args.direction or "bi")
    form = "online" if args.online else "offline"
    path = args.output or f"{args.model.split(':')[-1]}_{form}.onnx"
    outputs = output_files(path)
    claim_outputs(outputs, args.force)  # before anything slow or written
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = build_model(args.model, checkpoint=args.checkpoint, **kwargs).eval()
    size = args.size or default_frame_size(model)
    frame_shape = (3, size, size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    start = time.perf_counter()
    direction, slot = shift_for_checkpoint(args.checkpoint, direction, args.uni_slot, "--checkpoint", log=cli_log)
    net = tsm_surgery.convert(model, args.n_segments, shift_div=args.shift_div, direction=direction,
                              uni_slot=slot, example_input=torch.randn((1,) + frame_shape), inplace=True)
    check_checkpoint_layout(args.checkpoint, net, "--checkpoint", log=cli_log)
    if args.online:
        online = tsm_surgery.to_online(net, frame_shape=frame_shape, inplace=True)
        io = export_online(online, path, args.batch_size, frame_shape, args.exporter)
    else:
        io = export_offline(net, path, frame_shape, args.exporter)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    sidecar = {
        "format": SIDECAR_FORMAT,
        "onnx": os.path.basename(path),
        "form": form,
        "model": args.model,
        "checkpoint": args.checkpoint,
        "n_segments": None if args.online else args.n_segments,
        "shift_div": args.shift_div,
        "direction": direction,
        "uni_slot": slot if direction == "uni" else None,
        "sites": [s.name for s in net.sites],
        "preprocess": {"size": size, "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
                       "std": list(cfg.get("std", (0.229, 0.224, 0.225))), "scale": "RGB in [0, 1]"},
        **io,
    }
    if args.online:
        sidecar["usage"] = ("run one frame at a time; feed each state[i].output back as state[i].input "
                            "at the next frame; initialise the caches with zeros")
    else:
        sidecar["usage"] = f"clips holds N clips of {args.n_segments} contiguous frames; N may vary"
    side_path = outputs[-1][0]
    with open(side_path, "w") as f:
        json.dump(sidecar, f, indent=2)
    written = [p for p, _ in outputs if os.path.exists(p)]
    print(f"wrote {', '.join(written)} ({form}, {len(net.sites)} shift sites, {args.exporter} exporter, "
          f"{time.perf_counter() - start:.1f} s); they belong together")
    return 0

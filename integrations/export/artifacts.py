"""What every export target shares: the sidecar, the example inputs, staged writing, the extra to install.

An export is a *set* of files: the runtime's artifact (one file or several) and one JSON sidecar
that names the frame input, every cache's input and output with its shape, the output, the dtype
and the settings the network was converted with; :mod:`.writer` writes it all or nothing.

Example:
    >>> sidecar_path("exports/mbv2.xml")
    'exports/mbv2.json'
"""

import importlib
import json
import os
from typing import Any

import torch

import tsm_surgery

__all__ = ["SIDECAR_FORMAT", "TARGETS", "EXTRA", "require", "require_target", "tensor_spec",
           "online_example", "online_io", "offline_io", "read_sidecar", "sidecar_path", "torch_export"]

SIDECAR_FORMAT = "tsm_surgery.export/1"
TARGETS = ("onnx", "openvino", "executorch")
# The pyproject extra that installs each target's packages.
EXTRA = {"onnx": "export", "openvino": "deploy", "executorch": "deploy"}
# The package each target writes with; checked before any slow work.
WRITER_MODULE = {"onnx": "onnx", "openvino": "openvino", "executorch": "executorch.exir"}


def require(module: str, target: str) -> Any:
    """Imports ``module`` for ``target``; a missing package names the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"the {target} target needs the {module.split('.')[0]!r} package ({err}); install it "
                          f"with: pip install 'tsm_surgery[{EXTRA[target]}]'") from None


def require_target(target: str) -> None:
    """Raises :class:`ImportError` naming the extra when ``target``'s exporter is not installed."""
    require(WRITER_MODULE[target], target)


def tensor_spec(name: str, t: torch.Tensor, **extra: Any) -> dict[str, Any]:
    """A sidecar entry: name, shape and dtype of ``t``."""
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), **extra}


@torch.no_grad()
def online_example(online: "tsm_surgery.OnlineTSM", batch_size: int, frame_shape: tuple[int, int, int]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Zero frames, zero caches and the step's output on them: the example inputs of an online export."""
    online.eval()
    state = online.init_state(batch_size, frame_shape=frame_shape)
    first = next(iter(state.values()))
    frames = torch.zeros((batch_size,) + tuple(frame_shape), dtype=first.dtype, device=first.device)
    out, _ = online.step(frames, state)
    return frames, state, out


def offline_example(net: "tsm_surgery.TSMNet", frame_shape: tuple[int, int, int], clips: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero clips (``clips * n_segments`` frames, on the net's device and dtype) and the net's output on them."""
    net.eval()
    param = next(net.parameters())  # a model on CUDA exports from CUDA inputs
    x = torch.zeros((clips * net.n_segments,) + tuple(frame_shape), dtype=param.dtype, device=param.device)
    with torch.no_grad():
        return x, net(x)


def online_io(frames: torch.Tensor, state: dict[str, torch.Tensor], out: torch.Tensor) -> dict[str, Any]:
    """Sidecar ``inputs``/``outputs``/``state`` of an online step: ``frames``, ``cache_<i>`` -> ``output``,
    ``new_cache_<i>``, ``i`` in the network's ``state_names`` order."""
    cache_in = [f"cache_{i}" for i in range(len(state))]
    cache_out = [f"new_cache_{i}" for i in range(len(state))]
    caches = list(state.values())
    ins = [tensor_spec(n, c, site=s) for n, c, s in zip(cache_in, caches, state)]
    outs = [tensor_spec(n, c, site=s) for n, c, s in zip(cache_out, caches, state)]
    return {
        "inputs": [tensor_spec("frames", frames)] + ins,
        "outputs": [tensor_spec("output", out)] + outs,
        "state": [{"site": s, "input": i, "output": o, "shape": list(c.shape),
                   "dtype": str(c.dtype).replace("torch.", ""), "init": "zeros"}
                  for s, i, o, c in zip(state, cache_in, cache_out, caches)],
    }


def offline_io(clips: torch.Tensor, out: torch.Tensor, n_segments: int, dynamic: bool) -> dict[str, Any]:
    """Sidecar ``inputs``/``outputs`` of a clip network; a dynamic batch reads ``N*T``."""
    inputs, outputs = tensor_spec("clips", clips), tensor_spec("output", out)
    if dynamic:
        inputs["shape"][0] = outputs["shape"][0] = f"N*{n_segments}"
    return {"inputs": [inputs], "outputs": [outputs], "state": []}


def torch_export(module: torch.nn.Module, args: tuple, dynamic_shapes: Any = None) -> "torch.export.ExportedProgram":
    """``torch.export.export`` in inference mode: the program OpenVINO and ExecuTorch start from."""
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes)


def sidecar_path(path: str, artifact: str = "the artifact") -> str:
    """The sidecar of artifact ``path``: the same path with ``.json``; refuses to put it on the artifact."""
    side = os.path.splitext(path)[0] + ".json"
    if os.path.abspath(side) == os.path.abspath(path):
        raise ValueError(f"--output {path}: the JSON sidecar is the artifact's path with .json, so it would "
                         f"overwrite {artifact}; give it its runtime's suffix (.onnx, .xml, .pte).")
    return side


_REQUIRED = ("form", "inputs", "outputs", "state", "preprocess")


def read_sidecar(path: str) -> dict[str, Any]:
    """Reads and checks a sidecar; returns it with ``target`` and ``artifact`` filled for old ONNX sidecars."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such sidecar; pass the .json that export wrote next to the artifact.")
    try:
        with open(path) as f:
            sidecar = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); pass the sidecar .json that export wrote.") from None
    if not isinstance(sidecar, dict) or any(k not in sidecar for k in _REQUIRED):
        raise ValueError(f"{path} is not an export sidecar (it lacks {[k for k in _REQUIRED if k not in sidecar]}); "
                         "pass the .json that tsm-surgery export wrote.")
    sidecar.setdefault("target", "onnx")  # sidecars written before the other targets existed
    sidecar.setdefault("artifact", sidecar.get("onnx"))
    if sidecar["target"] not in TARGETS or not sidecar["artifact"]:
        raise ValueError(f"{path}: unknown target {sidecar['target']!r} or no artifact named; re-export it.")
    return sidecar

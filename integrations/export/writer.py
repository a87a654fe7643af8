"""One export set: the artifact of a target and its sidecar, written all or nothing.

:func:`export_set` is what ``tsm-surgery export`` and the deploy bench call: it picks the target's
module (:mod:`.onnx`, :mod:`.openvino`, :mod:`.executorch`), checks the destination before any
slow work, writes every file through ``outputs.atomic_outputs`` and returns the sidecar.

Example::

    online = tsm_surgery.to_online(tsm_surgery.convert(model, n_segments=8, direction="uni"))
    sidecar = export_set("openvino", online, "mbv2.xml", frame_shape=(3, 224, 224))
    runner = tsm_surgery.integrations.export.runtime.load("mbv2.json")
"""

import importlib
import json
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

import tsm_surgery
from tsm_surgery.integrations.outputs import atomic_outputs

from .artifacts import SIDECAR_FORMAT, TARGETS, require_target

__all__ = ["export_set", "export_int8_set", "target_module", "SUFFIX"]

SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte"}


def target_module(target: str) -> ModuleType:
    """The module of export target ``target`` (its runtime is imported only when it writes)."""
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: choose one of {', '.join(TARGETS)}.")
    return importlib.import_module(f"{__package__}.{target}")


def _default_preprocess(frame_shape: tuple[int, int, int]) -> dict[str, Any]:
    """ImageNet statistics on [0, 1] RGB, what timm and torchvision models expect; callers override it."""
    return {"size": frame_shape[-1], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "scale": "RGB in [0, 1]"}


def _usage(online: bool, segments: int | None) -> str:
    if online:
        return ("run one frame at a time; feed each state[i].output back as state[i].input at the next frame; "
                "initialise the caches with zeros")
    return f"clips holds N clips of {segments} contiguous frames"


def export_set(target: str, network: "tsm_surgery.OnlineTSM | tsm_surgery.TSMNet", path: str, *,
               frame_shape: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1, clips: int = 1,
               precision: str = "f32", exporter: str = "dynamo", force: bool = False,
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes ``network`` for ``target`` at ``path`` with its sidecar (``path`` with ``.json``); returns the sidecar.

    Args:
        target: ``onnx``, ``openvino`` or ``executorch``.
        network: an :class:`~tsm_surgery.OnlineTSM` (the online step, caches in and out) or a
            :class:`~tsm_surgery.TSMNet` (the clip network).
        path: the artifact (``.onnx``, ``.xml``, ``.pte``); the other files go beside it.
        frame_shape: ``(C, H, W)`` of one preprocessed frame.
        batch_size: streams per online step.
        clips: clips per call of a fixed-batch clip network (OpenVINO, ExecuTorch; ONNX's is dynamic).
        precision: OpenVINO's inference precision recorded in the sidecar (``f32`` or ``bf16``).
        exporter: the torch.onnx exporter for ONNX (``dynamo`` or ``legacy``).
        force: replace an existing set.
        metadata: more sidecar fields (model, checkpoint, preprocess, ...).

    Raises:
        FileExistsError: a file of the set exists and ``force`` is false; nothing is written.
        ImportError: the target's runtime is not installed (the message names the extra).
    """
    module = target_module(target)
    outputs = module.output_files(path)
    online = isinstance(network, tsm_surgery.OnlineTSM)
    if not online and not isinstance(network, tsm_surgery.TSMNet):
        raise TypeError(f"export_set takes a tsm_surgery.OnlineTSM or TSMNet, got {type(network).__name__}; "
                        "hint: tsm_surgery.convert(model, ...) first.")
    if precision != "f32" and target != "openvino":
        raise ValueError(f"--precision {precision}: only the openvino target chooses a float precision at run time.")
    require_target(target)
    # The set is written to temporary paths (same basenames, so ONNX's .data reference holds) and replaces
    # the targets together when complete; checked before anything slow or written.
    with atomic_outputs(outputs, force) as temps:
        staged = dict(zip([p for p, _ in outputs], temps)).__getitem__
        if online:
            kwargs = {"exporter": exporter} if target == "onnx" else {}
            io = module.export_online(network, staged(path), batch_size, frame_shape, **kwargs)
        else:
            kwargs = {"exporter": exporter} if target == "onnx" else {"clips": clips}
            io = module.export_offline(network, staged(path), frame_shape, **kwargs)
        sidecar = {
            "format": SIDECAR_FORMAT, "target": target, "artifact": os.path.basename(path),
            "files": [os.path.basename(p) for p, _ in outputs[:-1]],
            **({"onnx": os.path.basename(path)} if target == "onnx" else {}),
            "form": "online" if online else "offline",
            "dtype": io["inputs"][0]["dtype"], "precision": precision, "batch_size": io["inputs"][0]["shape"][0],
            "n_segments": None if online else network.n_segments,
            "direction": "uni" if online else network.direction, "shift_div": network.shift_div,
            "input_size": frame_shape[-1], "preprocess": _default_preprocess(frame_shape),
            "sites": [s.name for s in network.sites],
            **(metadata or {}), **io, "usage": _usage(online, None if online else network.n_segments),
        }
        with open(staged(outputs[-1][0]), "w") as f:
            json.dump(sidecar, f, indent=2)
    return sidecar


def export_int8_set(target: str, net: "tsm_surgery.TSMNet", path: str, calibration: Sequence[torch.Tensor], *,
                    frame_shape: tuple[int, int, int] = (3, 224, 224), online: bool = True, force: bool = False,
                    metadata: dict[str, Any] | None = None, portable: bool | None = None) -> dict[str, Any]:
    """Static int8 of ``net`` for ``target`` (:func:`.int8.quantize`) at ``path`` with its sidecar, all or nothing.

    The sidecar is :func:`export_set`'s, read off the quantized artifact itself (names, shapes,
    dtypes), with ``dtype: "int8"`` and each cache's ``dtype``, ``scale`` and ``zero_point``
    (``runtime.load`` starts an int8 cache at its zero point, the quantized zero). The online
    step takes one stream (batch 1); the offline network takes clips of ``n_segments`` frames.

    Args:
        target: ``onnx``, ``openvino`` or ``executorch``.
        net: a converted network (``direction="uni"`` for ``online``); not modified.
        path: the artifact (``.onnx``, ``.xml``, ``.pte``); the other files go beside it.
        calibration: clips ``(T, *frame_shape)`` of preprocessed frames (``load_calibration``).
        frame_shape: ``(C, H, W)`` of one preprocessed frame.
        online: the one-frame step (default) or the clip network.
        force: replace an existing set.
        metadata: more sidecar fields (model, checkpoint, preprocess, ...).
        portable: int8 that CPUs without VNNI run without saturating (:func:`.int8.quantize`);
            ``None``: portable where this CPU has no VNNI. The sidecar's ``int8_portable`` says which.

    Raises:
        ValueError: calibration of the wrong shape, a bi network asked for the online form.
        FileExistsError: a file of the set exists and ``force`` is false; nothing is written.
        ImportError: the target's runtime or quantizer is not installed (the message names the extra).
    """
    from . import int8, runtime

    outputs = target_module(target).output_files(path)
    require_target(target)
    with atomic_outputs(outputs, force) as temps:
        staged = dict(zip([p for p, _ in outputs], temps)).__getitem__
        art = int8.quantize(target, net, calibration, staged(path), frame_shape, "online" if online else "clip",
                            portable)
        sites = list(tsm_surgery.to_online(net, frame_shape=frame_shape).init_state(1, frame_shape=frame_shape)
                     ) if online else []
        io = _int8_io(runtime.open_engine(target, art.files[0]), art, net.n_segments, sites)
        sidecar = {
            "format": SIDECAR_FORMAT, "target": target, "artifact": os.path.basename(path),
            "files": [os.path.basename(p) for p, _ in outputs[:-1] if os.path.exists(staged(p))],
            **({"onnx": os.path.basename(path)} if target == "onnx" else {}),
            "form": "online" if online else "offline", "dtype": "int8", "quantization": _QUANTIZERS[target],
            "int8_portable": art.portable,
            "precision": "f32", "batch_size": io["inputs"][0]["shape"][0],
            "n_segments": None if online else net.n_segments, "direction": net.direction,
            "shift_div": net.shift_div, "input_size": frame_shape[-1], "preprocess": _default_preprocess(frame_shape),
            "sites": [s.name for s in net.sites],
            **(metadata or {}), **io, "usage": _usage(online, None if online else net.n_segments)
            + ("; an int8 cache starts at its zero_point (the quantized zero)" if online else ""),
        }
        with open(staged(outputs[-1][0]), "w") as f:
            json.dump(sidecar, f, indent=2)
    return sidecar


# The tool behind each target's int8 (recorded in the sidecar).
_QUANTIZERS = {"onnx": "onnxruntime quantize_static (QDQ)", "openvino": "NNCF",
               "executorch": "PT2E XNNPACKQuantizer"}


def _int8_io(engine: Any, art: Any, n_segments: int, sites: list[str]) -> dict[str, Any]:
    """Sidecar ``inputs``/``outputs``/``state`` of an int8 artifact, shapes as the artifact declares them."""
    def shape(dims: list[int | None]) -> list[int | str]:
        return [f"N*{n_segments}" if d is None else d for d in dims]

    if art.form == "clip":
        return {"inputs": [{"name": "clips", "shape": shape(engine.input_shapes[0]), "dtype": "float32"}],
                "outputs": [{"name": "output", "shape": shape(engine.output_shapes[0]), "dtype": "float32"}],
                "state": []}
    caches = art.caches
    state = [{"site": site, "input": c["input"], "output": c["output"], "shape": list(c["shape"]),
              "dtype": c["dtype"], "scale": c["scale"], "zero_point": c["zero_point"], "init": "zero_point"}
             for site, c in zip(sites, caches)]
    return {
        "inputs": [{"name": "frames", "shape": shape(engine.input_shapes[0]), "dtype": "float32"}]
        + [{"name": c["input"], "shape": list(c["shape"]), "dtype": c["dtype"]} for c in caches],
        "outputs": [{"name": "output", "shape": shape(engine.output_shapes[0]), "dtype": "float32"}]
        + [{"name": c["output"], "shape": list(c["shape"]), "dtype": c["dtype"]} for c in caches],
        "state": state,
    }

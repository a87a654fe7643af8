"""Run an exported TSM network in its runtime from its sidecar: the online stream and the clip network.

:func:`load` reads a sidecar written by ``tsm-surgery export``, opens the artifact in its
runtime (onnxruntime, OpenVINO's CPU plugin or ExecuTorch's Python runtime), checks that the
artifact's inputs and outputs are the ones the sidecar names, and returns

* for an online export, an :class:`OnlineRunner`: ``step(frame) -> logits`` once per frame with
  the caches fed back inside, ``reset()`` for a new video; it is also a ``StepEngine``
  (``init_state(batch)``, ``step_state(frames, state) -> (logits, state)``) whose state the
  caller owns, padded to the artifact's fixed batch;
* for an offline export, a :class:`ClipRunner`: ``run(clips) -> logits`` for ``N*T`` frames.

Example::

    runner = load("mbv2_online.json")            # the sidecar names the runtime and the artifact
    runner.reset()
    for frame in frames:                         # (B, 3, H, W) float32, preprocessed
        logits = runner.step(frame)
"""

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .artifacts import EXTRA, TARGETS, read_sidecar, require

__all__ = ["Engine", "open_engine", "load", "OnlineRunner", "ClipRunner", "StepEngine", "ENGINES"]

ENGINES = TARGETS
Arrays = list[np.ndarray]


class Engine:
    """One compiled artifact: ``run(inputs) -> outputs``, numpy arrays in the artifact's order.

    ``input_shapes``/``output_shapes`` are what the artifact itself declares (``None`` for a
    dynamic dimension); :func:`load` compares them with the sidecar.
    """

    input_names: list[str]
    input_shapes: list[list[int | None]]
    output_shapes: list[list[int | None]]

    def run(self, inputs: Sequence[np.ndarray]) -> Arrays:
        raise NotImplementedError


class _OnnxEngine(Engine):
    def __init__(self, path: str, threads: int | None = None):
        ort = require("onnxruntime", "onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_shapes = [[d if isinstance(d, int) else None for d in i.shape] for i in self.session.get_inputs()]
        self.output_shapes = [[d if isinstance(d, int) else None for d in o.shape] for o in self.session.get_outputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> Arrays:
        return self.session.run(None, dict(zip(self.input_names, inputs)))


class _OpenVinoEngine(Engine):
    def __init__(self, path: str, precision: str = "f32", threads: int | None = None):
        ov = require("openvino", "openvino")
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.input_shapes = [_ov_shape(p.get_partial_shape()) for p in self.compiled.inputs]
        self.output_shapes = [_ov_shape(p.get_partial_shape()) for p in self.compiled.outputs]

    def run(self, inputs: Sequence[np.ndarray]) -> Arrays:
        # share_inputs: the arrays are read in place during this synchronous call; the outputs come
        # back as copies (share_outputs=False), since the request reuses its buffers at the next call.
        results = self.request.infer(list(inputs), share_inputs=True, share_outputs=False)
        return list(results.to_tuple())


def _ov_shape(shape: Any) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in shape]


class _ExecuTorchEngine(Engine):
    def __init__(self, path: str, threads: int | None = None):
        runtime = require("executorch.runtime", "executorch")
        self.program = runtime.Runtime.get().load_program(path)
        self.method = self.program.load_method("forward")
        meta = self.method.metadata
        self.input_names = [f"input_{i}" for i in range(meta.num_inputs())]
        self.input_shapes = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        self.output_shapes = [list(meta.output_tensor_meta(i).sizes()) for i in range(meta.num_outputs())]

    def run(self, inputs: Sequence[np.ndarray]) -> Arrays:
        outs = self.method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        # Outputs live in the program's planned memory, which the next call overwrites.
        return [o.numpy().copy() for o in outs]


def open_engine(engine: str, path: str, precision: str | None = None, threads: int | None = None) -> Engine:
    """Opens artifact ``path`` in runtime ``engine`` (``onnx``, ``openvino`` or ``executorch``).

    ``precision`` is OpenVINO's inference precision (``f32`` default, or ``bf16``); the other
    runtimes run the artifact's own dtype and refuse another.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the artifact is missing; it belongs next to its sidecar (re-export both).")
    if engine == "openvino":
        return _OpenVinoEngine(path, precision or "f32", threads)
    if precision not in (None, "f32"):
        raise ValueError(f"precision {precision!r}: only the openvino engine chooses a precision at run time; "
                         f"{engine} runs the artifact's own (f32).")
    return _OnnxEngine(path, threads) if engine == "onnx" else _ExecuTorchEngine(path, threads)


def _check_against(engine: Engine, sidecar: dict[str, Any], path: str) -> None:
    """Raises when the artifact's inputs/outputs are not the sidecar's (count, order, shapes)."""
    pairs = [("input", sidecar["inputs"], engine.input_shapes), ("output", sidecar["outputs"], engine.output_shapes)]
    for kind, specs, shapes in pairs:
        if len(specs) != len(shapes):
            raise ValueError(f"{path}: the sidecar names {len(specs)} {kind}s, the artifact has {len(shapes)}; "
                             "they do not belong together (re-export both with tsm-surgery export).")
        for spec, shape in zip(specs, shapes):
            want = [d if isinstance(d, int) else None for d in spec["shape"]]
            if len(want) != len(shape) or any(a is not None and b is not None and a != b for a, b in zip(want, shape)):
                raise ValueError(f"{path}: the sidecar's {kind} {spec['name']!r} has shape {spec['shape']}, the "
                                 f"artifact's has {shape}; they do not belong together (re-export both).")


def load(sidecar_path: str, engine: str | None = None, precision: str | None = None,
         threads: int | None = None) -> "OnlineRunner | ClipRunner":
    """Opens the artifact a sidecar names and checks them against each other.

    Args:
        sidecar_path: the ``.json`` that ``tsm-surgery export`` wrote.
        engine: the runtime; default the sidecar's target. OpenVINO also reads an ONNX artifact.
        precision: OpenVINO's inference precision (default: the sidecar's, else ``f32``).
        threads: CPU threads of the runtime (default: its own).
    """
    sidecar = read_sidecar(sidecar_path)
    engine = engine or sidecar["target"]
    if engine != sidecar["target"] and not (engine == "openvino" and sidecar["target"] == "onnx"):
        raise ValueError(f"--engine {engine}: {sidecar_path} is a {sidecar['target']} export; use --engine "
                         f"{sidecar['target']} or export with --target {engine} "
                         f"(pip install 'tsm_surgery[{EXTRA[engine]}]').")
    path = os.path.join(os.path.dirname(os.path.abspath(sidecar_path)), sidecar["artifact"])
    compiled = open_engine(engine, path, precision or sidecar.get("precision"), threads)
    _check_against(compiled, sidecar, sidecar_path)
    _warn_if_saturating(sidecar, engine, sidecar_path)
    runner = OnlineRunner if sidecar["form"] == "online" else ClipRunner
    return runner(compiled, sidecar)


def _warn_if_saturating(sidecar: dict[str, Any], engine: str, path: str) -> None:
    """An int8 export made for VNNI CPUs, run on an x86 CPU without VNNI: its sums may saturate."""
    if sidecar.get("dtype") != "int8" or sidecar.get("int8_portable", True) or engine == "executorch":
        return
    from .int8_cpu import saturating_int8

    if saturating_int8():
        warnings.warn(f"{path}: this int8 export uses the full 8-bit weight range, which this CPU (x86 without VNNI) "
                      "may saturate, moving outputs by a large fraction of their range. Hint: re-export with "
                      "--int8-portable.", RuntimeWarning, stacklevel=3)


class ClipRunner:
    """The clip network of an offline export: ``run(clips)`` for ``N*T`` frames, any ``N``.

    An artifact with a fixed number of clips runs the input in chunks of that size (the last
    one padded with zero clips, whose outputs are dropped).
    """

    def __init__(self, engine: Engine, sidecar: dict[str, Any]):
        self.engine, self.sidecar = engine, sidecar
        self.n_segments = int(sidecar["n_segments"])
        batch = sidecar["inputs"][0]["shape"][0]
        self.fixed_batch = batch if isinstance(batch, int) else None

    def run(self, clips: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits of ``clips`` ``(N*T, C, H, W)``, one row per frame as the PyTorch network returns."""
        x = _numpy(clips)
        if x.shape[0] % self.n_segments:
            raise ValueError(f"clips has {x.shape[0]} frames, not a multiple of n_segments={self.n_segments}.")
        if self.fixed_batch is None:
            return self.engine.run([x])[0]
        parts = []
        for start in range(0, x.shape[0], self.fixed_batch):
            chunk = x[start:start + self.fixed_batch]
            rows = chunk.shape[0]
            chunk = _pad_rows(chunk, self.fixed_batch)
            parts.append(self.engine.run([chunk])[0][:rows])
        return np.concatenate(parts)

    __call__ = run


class OnlineRunner:
    """The online step of an export, caches fed back: ``step(frame) -> logits`` once per frame.

    The sidecar's batch is the artifact's: ``step`` takes up to that many streams' frames
    (fewer are padded with zero rows). ``init_state``/``step_state`` are the stateless form for
    callers that own the caches (one row per stream), e.g. a frame loop serving several streams.
    """

    def __init__(self, engine: Engine, sidecar: dict[str, Any]):
        self.engine, self.sidecar = engine, sidecar
        self.batch_size = int(sidecar["inputs"][0]["shape"][0])
        self.frame_shape = tuple(sidecar["inputs"][0]["shape"][1:])
        self.state_names = [s["input"] for s in sidecar["state"]]
        self._state = self.init_state(self.batch_size)

    def init_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Caches for ``batch_size`` streams before the first frame: zeros in the cache's dtype.

        A quantized cache (sidecar ``dtype`` ``int8`` or ``uint8``) starts at its ``zero_point``: the quantized zero.
        """
        return {s["input"]: torch.full([batch_size] + list(s["shape"][1:]), _initial_value(s),
                                       dtype=getattr(torch, s.get("dtype", "float32")))
                for s in self.sidecar["state"]}

    def reset(self) -> None:
        """Starts a new stream: caches back to zeros."""
        self._state = self.init_state(self.batch_size)

    def step_state(self, frames: torch.Tensor, state: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step for ``frames`` ``(n, C, H, W)`` and their caches (row ``i`` = stream ``i``), any ``n``.

        Rows run in chunks of the artifact's batch, the last one padded with zero rows.
        """
        if tuple(frames.shape[1:]) != self.frame_shape:
            raise ValueError(f"frames of shape {tuple(frames.shape)}: the artifact takes frames of "
                             f"{self.frame_shape}; re-export with --size to change it.")
        if frames.shape[0] <= self.batch_size:  # one chunk: no copies into joined outputs
            return self._run_chunk(frames, state)
        logits, states = [], []
        for start in range(0, frames.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            out, new = self._run_chunk(frames[rows], {name: state[name][rows] for name in self.state_names})
            logits.append(out)
            states.append(new)
        return torch.cat(logits), {name: torch.cat([s[name] for s in states]) for name in self.state_names}

    def _run_chunk(self, frames: torch.Tensor, state: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = frames.shape[0]
        inputs = [_pad_rows(_numpy(frames), self.batch_size)]
        # caches keep their dtype (float32, or 8-bit codes in a quantized step)
        inputs += [_pad_rows(np.ascontiguousarray(state[name].numpy()), self.batch_size) for name in self.state_names]
        outs = self.engine.run(inputs)
        if n == self.batch_size:
            return torch.from_numpy(outs[0]), dict(zip(self.state_names, map(torch.from_numpy, outs[1:])))
        new_state = {name: torch.from_numpy(out[:n]) for name, out in zip(self.state_names, outs[1:])}
        return torch.from_numpy(outs[0][:n]), new_state

    def step_engine(self) -> "StepEngine":
        """This runner as the frame loop's ``StepEngine``: ``init_state(batch)``, ``step(frames, state)``."""
        return StepEngine(self)

    def step(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Logits of this frame (``(B, C, H, W)``); the caches advance by one frame."""
        logits, self._state = self.step_state(torch.as_tensor(frames), self._state)
        return logits

    __call__ = step


class StepEngine:
    """The stateless view of an :class:`OnlineRunner`: the caller owns the caches, one row per stream.

    ``init_state(batch_size)`` gives the caches before the first frame; ``step(frames, state)``
    returns ``(logits, new_state)`` for any number of rows.
    """

    def __init__(self, runner: OnlineRunner):
        self.runner = runner
        self.init_state = runner.init_state
        self.step = runner.step_state


CODE_DTYPES = ("int8", "uint8")  # caches held as quantized codes (onnxruntime: uint8, ExecuTorch: int8)


def _initial_value(cache: dict[str, Any]) -> int:
    """A cache's value before the first frame: the zero point of quantized codes, else 0.0.

    A float cache of a quantized network (OpenVINO's, quantized on entry) also records a zero
    point; it still starts at the real zero.
    """
    return int(cache.get("zero_point") or 0) if cache.get("dtype") in CODE_DTYPES else 0


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])

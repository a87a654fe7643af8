"""int8 static post-training quantization of a TSM network, for three CPU runtimes and for PyTorch.

Each runtime's own recommended tool does the work, calibrated on decoded real clips
(:func:`tsm_surgery.integrations.streaming.calibration.load_calibration`; the demo's synthetic
videos by default):

* ``"onnx"``: onnxruntime's ``quantize_static``, QDQ format (:mod:`.int8_onnx`);
* ``"openvino"``: NNCF's ``nncf.quantize`` on the OpenVINO model (:mod:`.int8_openvino`);
* ``"executorch"``: PT2E with the XNNPACK quantizer, lowered with the XNNPACK partitioner
  (:mod:`.int8_pt2e`); :func:`quantize_pytorch` stops before lowering, for users who stay in PyTorch.

Two forms: ``"online"``, the one-frame step of :func:`tsm_surgery.to_online` (inputs ``frames``
and one cache per shift site, outputs ``output`` and the new caches), and ``"clip"``, the clip
network (one clip of ``n_segments`` frames, ``(T, C, H, W)``).

The shift is exact in int8 when it keeps its input's quantization parameters, so every route
makes it do so: the shift's slices, concatenation and zero slot share the scale and zero point
of the tensor they move (no requantize around it), the empty slot is the quantized zero, no
observer calibrates a zero-filled slot alone, and the online caches are int8 at the scale of
what they cache (onnxruntime and ExecuTorch take and return them as 8-bit codes; OpenVINO keeps
its I/O in float and quantizes the cache with the shifted tensor's FakeQuantize on entry). The
int8 step streamed over a clip then gives the int8 clip network's outputs frame by frame.

Example:
    >>> import timm, tsm_surgery
    >>> from tsm_surgery.integrations.streaming.calibration import load_calibration
    >>> net = tsm_surgery.convert(timm.create_model("mobilenetv2_100", num_classes=6), n_segments=4,
    ...                           direction="uni", example_input=torch.randn(1, 3, 32, 32))
    >>> clips = load_calibration(None, size=32, n_frames=4, max_clips=2)   # demo videos
    >>> art = quantize("onnx", net, clips, "mbv2_step_int8.onnx", frame_shape=(3, 32, 32))  # doctest: +SKIP
    >>> art.files, art.caches[0]["dtype"]                                                  # doctest: +SKIP
    (['mbv2_step_int8.onnx'], 'int8')
    >>> run = load(art)                                                                    # doctest: +SKIP
    >>> out, *caches = run(frame, *art.zero_caches())                                      # doctest: +SKIP
"""

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import tsm_surgery

from .calibration import check_calibration, online_feeds
from .int8_cpu import portable_default
from .runtime import CODE_DTYPES

__all__ = ["TARGETS", "FORMS", "Int8Artifact", "quantize", "quantize_pytorch", "load"]

TARGETS = ("onnx", "openvino", "executorch")
FORMS = ("online", "clip")
_EXTRAS = {"onnx": ("onnxruntime", "export"), "openvino": ("nncf", "deploy"), "executorch": ("executorch", "deploy")}


@dataclass
class Int8Artifact:
    """What :func:`quantize` wrote: the files (all of them belong together) and the I/O contract.

    ``caches``: one dict per online cache, in input order: ``input``/``output`` names, ``shape``,
    ``dtype`` (``"uint8"`` or ``"int8"`` where the runtime takes codes, else ``"float32"``), ``scale`` and
    ``zero_point`` (the first frame's cache is all ``zero_point`` codes, i.e. the quantized zero).
    ``portable``: made to run without saturation on x86 CPUs without VNNI too (see :mod:`.int8_cpu`).
    """

    target: str
    form: str
    files: list[str]
    frame_shape: tuple[int, ...]
    n_segments: int | None = None
    caches: list[dict] = field(default_factory=list)
    portable: bool = True

    def zero_caches(self, batch_size: int = 1) -> list[np.ndarray]:
        """The state before the first frame, in the dtype the artifact takes."""
        out = []
        for c in self.caches:
            shape = (batch_size, *c["shape"][1:])
            if c["dtype"] in CODE_DTYPES:
                out.append(np.full(shape, c["zero_point"], np.dtype(c["dtype"])))
            else:
                out.append(np.zeros(shape, np.float32))
        return out


def _require(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}.")
    module, extra = _EXTRAS[target]
    try:
        __import__(module)
    except ImportError:
        raise ImportError(f"int8 for {target} needs {module}: pip install 'tsm-surgery[{extra}]'") from None


def _online(net: "tsm_surgery.TSMNet", frame_shape: tuple[int, ...]):
    if net.direction != "uni":
        raise ValueError("form='online' needs a uni-directional network (a bi network reads future frames); "
                         "convert with direction='uni', or quantize form='clip'.")
    online = tsm_surgery.to_online(net, frame_shape=frame_shape).eval()
    state = online.init_state(1, frame_shape=frame_shape)
    return online.step_module, list(state.values()), list(state)


def _checked(net, clips, frame_shape, form) -> list[torch.Tensor]:
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not one of {FORMS}.")
    clips = check_calibration(clips, frame_shape)
    if form == "clip":
        bad = [i for i, c in enumerate(clips) if c.shape[0] != net.n_segments]
        if bad:
            raise ValueError(f"calibration clip {bad[0]} has {clips[bad[0]].shape[0]} frames; the clip network takes "
                             f"n_segments={net.n_segments}. Hint: load_calibration(..., n_frames={net.n_segments}).")
    return clips


def quantize_pytorch(net: "tsm_surgery.TSMNet", calibration: Sequence[torch.Tensor], frame_shape: Sequence[int],
                     form: str = "online") -> nn.Module:
    """PT2E int8 (XNNPACK quantizer, shift-aware) as a PyTorch module; see :mod:`.int8_pt2e`.

    ``form="online"``: ``module(frame, *caches) -> (output, *new_caches)`` with float caches
    (start from zeros); ``form="clip"``: ``module(clip) -> output``, ``clip`` ``(T, C, H, W)``.
    """
    from .int8_pt2e import quantize_module

    frame_shape = tuple(frame_shape)
    clips = _checked(net, calibration, frame_shape, form)
    module, example, calibrate = _pt2e_form(net, clips, frame_shape, form)
    return quantize_module(module, example, calibrate)


def _pt2e_form(net, clips, frame_shape, form):
    if form == "clip":
        def calibrate_clips(prepared):
            for clip in clips:
                prepared(clip)
        return net.eval(), (clips[0],), calibrate_clips
    step, state, _ = _online(net, frame_shape)

    def calibrate_stream(prepared):
        for _ in online_feeds(prepared, state, clips):
            pass  # online_feeds runs the prepared step on every frame, the caches fed back
    return step, (clips[0][:1], *state), calibrate_stream


def quantize(target: str, net: "tsm_surgery.TSMNet", calibration: Sequence[torch.Tensor], path: str,
             frame_shape: Sequence[int], form: str = "online", portable: bool | None = None) -> Int8Artifact:
    """Static int8 of ``net``'s online step or clip network for ``target``, written to ``path``.

    Args:
        target: ``"onnx"`` (``.onnx``), ``"openvino"`` (``.xml`` + ``.bin``) or ``"executorch"`` (``.pte``).
        net: a converted network (``direction="uni"`` for ``form="online"``); not modified.
        calibration: clips ``(T, *frame_shape)`` of normalised frames (:func:`load_calibration`).
        path: the artifact's path; its companion files go beside it. Written only when all succeed.
        frame_shape: ``(C, H, W)`` of one frame.
        form: ``"online"`` or ``"clip"``.
        portable: int8 weights that no x86 CPU's kernels saturate (onnxruntime: uint8 weights;
            OpenVINO: 7-bit weights): slower in onnxruntime (its U8U8 kernels) and a little less
            precise in OpenVINO than the full int8 range, which is exact on CPUs with VNNI.
            ``None`` (the default): portable exactly when this CPU has no VNNI
            (:func:`.int8_cpu.saturating_int8`). ExecuTorch's export is the same either way.

    Returns:
        The :class:`Int8Artifact`.

    Raises:
        ValueError: a calibration clip of the wrong frame size, channel count or length, a bi
            network asked for the online form, an unknown target or form.
        ImportError: the runtime is not installed (the message names the extra).
    """
    _require(target)
    frame_shape = tuple(frame_shape)
    clips = _checked(net, calibration, frame_shape, form)
    net = net.eval()
    final = os.path.abspath(path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(final), prefix=".int8_") as tmp:
        staged = os.path.join(tmp, os.path.basename(final))
        art = _QUANTIZERS[target](net, clips, staged, frame_shape, form, tmp, portable_default(portable))
        files = []
        for name in art.files:
            dest = os.path.join(os.path.dirname(final), os.path.basename(name))
            os.replace(name, dest)
            files.append(dest)
        art.files = files
    return art


def _float_onnx(net, clips, frame_shape, form, tmp) -> tuple[str, list[str], list[tuple[str, str]]]:
    """The float ONNX graph the onnxruntime route starts from: path, input names, cache pairs."""
    from .onnx import export_offline, export_online

    path = os.path.join(tmp, "float", "model.onnx")
    os.makedirs(os.path.dirname(path))
    if form == "clip":
        export_offline(net, path, frame_shape)
        return path, ["clips"], []
    online = tsm_surgery.to_online(net, frame_shape=frame_shape)
    io = export_online(online, path, 1, frame_shape)
    names = [i["name"] for i in io["inputs"]]
    return path, names, [(s["input"], s["output"]) for s in io["state"]]


def _feeds(net, clips, frame_shape, form, names) -> list[dict[str, np.ndarray]]:
    if form == "clip":
        return [{"clips": c.numpy()} for c in clips]
    step, state, _ = _online(net, frame_shape)
    return [dict(zip(names, (t.numpy() for t in feed))) for feed in online_feeds(step, state, clips)]


def _cache_specs(net, frame_shape, form, pairs, qparams: dict, dtype: str) -> list[dict]:
    if form == "clip":
        return []
    _, state, _ = _online(net, frame_shape)
    specs = []
    for (cache_in, cache_out), tensor in zip(pairs, state):
        scale, zero = qparams.get(cache_in, (None, None))
        specs.append({"input": cache_in, "output": cache_out, "shape": list(tensor.shape), "dtype": dtype,
                      "scale": scale, "zero_point": zero})
    return specs


def _quantize_onnx(net, clips, staged, frame_shape, form, tmp, portable) -> Int8Artifact:
    from .int8_onnx import CODES, quantize_onnx

    float_path, names, pairs = _float_onnx(net, clips, frame_shape, form, tmp)
    found = quantize_onnx(float_path, staged, _feeds(net, clips, frame_shape, form, names), pairs, portable)
    return Int8Artifact("onnx", form, [staged], frame_shape, net.n_segments if form == "clip" else None,
                        _cache_specs(net, frame_shape, form, pairs, found, CODES), portable)


def _quantize_openvino(net, clips, staged, frame_shape, form, tmp, portable) -> Int8Artifact:
    from .int8_openvino import quantize_openvino

    float_path, names, pairs = _float_openvino(net, clips, frame_shape, form, tmp)
    xml = os.path.splitext(staged)[0] + ".xml"
    found = quantize_openvino(float_path, xml, _feeds(net, clips, frame_shape, form, names), [i for i, _ in pairs],
                              portable)
    return Int8Artifact("openvino", form, [xml, os.path.splitext(xml)[0] + ".bin"], frame_shape,
                        net.n_segments if form == "clip" else None,
                        _cache_specs(net, frame_shape, form, pairs, found, "float32"), portable)


def _float_openvino(net, clips, frame_shape, form, tmp) -> tuple[str, list[str], list[tuple[str, str]]]:
    """The float IR NNCF quantizes: the folded forms (no channel split and concat, which the CPU plugin
    runs in reference kernels), the online step's and the clip network's folded alike."""
    from .artifacts import offline_example
    from .openvino import export_online, write

    path = os.path.join(tmp, "float", "model.xml")
    os.makedirs(os.path.dirname(path))
    if form == "clip":
        example, _ = offline_example(net, frame_shape, 1)
        write(net.folded_module(), (example,), path, ["clips"], ["output"])
        return path, ["clips"], []
    io = export_online(tsm_surgery.to_online(net, frame_shape=frame_shape), path, 1, frame_shape)  # folded
    return path, [i["name"] for i in io["inputs"]], [(s["input"], s["output"]) for s in io["state"]]


def _quantize_executorch(net, clips, staged, frame_shape, form, tmp, portable) -> Int8Artifact:
    from .int8_pt2e import quantize_module, to_executorch

    module, example, calibrate = _pt2e_form(net, clips, frame_shape, form)
    quantized = quantize_module(module, example, calibrate)
    caches = list(range(1, len(example)))
    found = to_executorch(quantized, example, staged, caches, caches)
    _check_lowering(staged, quantized, module, example, found["inputs"])
    pairs = [(f"cache_{i - 1}", f"new_cache_{i - 1}") for i in caches]
    qparams = {pairs[k][0]: found["inputs"][i] for k, i in enumerate(caches)}
    return Int8Artifact("executorch", form, [staged], frame_shape, net.n_segments if form == "clip" else None,
                        _cache_specs(net, frame_shape, form, pairs, qparams, "int8"))


# The lowered program rounds differently from the quantized module (integer requantization in
# XNNPACK, float arithmetic between quantize/dequantize pairs in PyTorch), so their logits differ by
# about as much as int8 itself moves them from float32: a few percent of the logits' range on a
# trained network, up to a fifth on a random MobileNetV2. A wrong lowering (inputs read in another
# layout, for one) differs by about the range itself.
LOWERING_TOLERANCE = 0.15  # of the logits' range, the least difference that is refused
ROUNDING_FACTOR = 2.0  # ... and more than this times the quantized module's own distance from float32


def _check_lowering(path: str, quantized: nn.Module, float_module: nn.Module, example: tuple,
                    int8_inputs: dict[int, tuple[float, int]]) -> None:
    """Runs the written ExecuTorch program once against the quantized PyTorch module it was lowered from.

    Refused when they differ by more than :data:`LOWERING_TOLERANCE` of the logits' range and more
    than :data:`ROUNDING_FACTOR` times the distance of the quantized module from ``float_module``.
    """
    from .runtime import open_engine

    inputs = []
    for i, x in enumerate(example):
        if i in int8_inputs:  # a cache the program takes as int8 codes
            scale, zero = int8_inputs[i]
            inputs.append(np.clip(np.round(x.numpy() / scale) + zero, -128, 127).astype(np.int8))
        else:
            inputs.append(x.numpy())
    with torch.no_grad():
        expected, reference = (_first_output(m(*example)).numpy() for m in (quantized, float_module))
    got = open_engine("executorch", path).run(inputs)[0]
    diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    rounding = float(np.abs(expected - reference).max())
    if diff > max(LOWERING_TOLERANCE * scale, ROUNDING_FACTOR * rounding):
        raise RuntimeError(
            f"ExecuTorch's XNNPACK int8 program computes other outputs than the quantized PyTorch model it was "
            f"lowered from (max difference {diff:.3g} on outputs up to {scale:.3g}; int8 itself moves them "
            f"{rounding:.3g} from float32), so it was not written. Hint: "
            "int8 through --target onnx or openvino, or ExecuTorch in float32; in Python, "
            "int8.quantize_pytorch gives the quantized model itself.")


def _first_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


_QUANTIZERS: dict[str, Callable[..., Int8Artifact]] = {
    "onnx": _quantize_onnx, "openvino": _quantize_openvino, "executorch": _quantize_executorch}


def load(art: Int8Artifact, threads: int | None = None) -> Callable[..., list[np.ndarray]]:
    """A callable running the artifact: ``run(frame, *caches)`` (online) or ``run(clip)``, numpy in and out.

    A minimal loader for tests and measurements; the project's runner reads the sidecar instead.
    """
    path = art.files[0]
    if art.target == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: session.run(None, dict(zip(names, xs)))
    if art.target == "openvino":
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = ov.Core().compile_model(path, "CPU", config)
        request = compiled.create_infer_request()
        return lambda *xs: [np.array(v) for v in request.infer(list(xs)).values()]
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return lambda *xs: [t.numpy() for t in method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in xs])]


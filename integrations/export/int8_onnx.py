"""int8 for onnxruntime: ``quantize_static`` in QDQ format, then the shift's scales tied to its input's.

``onnxruntime.quantization.quantize_static`` calibrates every tensor it quantizes on its own
(min/max over the calibration feeds). For the shift that is wrong three ways: ``Concat`` is not a
"same scale" op in its QDQ registry, so the shifted tensor gets a scale of its own (a requantize
between the shift's input and output); an online cache input is calibrated as a separate tensor;
and the zero-filled slot of the clip network (an ``Expand`` of 0) is calibrated alone, with the
range min = max = 0. :func:`tie_shift_qparams` rewrites the quantized graph so that every input
of each ``Concat``, its output and the caches use the quantization parameters of the activation
being shifted: the ``Slice`` ops before it already share them (``QDQDirect8BitOp``), so the shift
becomes ``DequantizeLinear -> Slice/Concat -> QuantizeLinear`` with one scale, which is exact and
which onnxruntime's QDQ optimizer may run on int8 directly; the zero slot quantizes to the zero point.

:func:`int8_cache_io` then makes the step take and return its caches as 8-bit codes: the
``QuantizeLinear`` after each cache input and the ``DequantizeLinear`` before each new-cache
output are removed, so the state between frames never leaves int8.

Activations are uint8 (asymmetric, a zero point per tensor) and weights int8 per channel, the
U8S8 form that onnxruntime's x86 kernels run fastest: measured on the online step, paired
against float32 on AVX-512 VNNI, MobileNetV2 1.65 ms against 2.33 ms with int8 activations
(float32 3.60 ms), ResNet-50 15.8 against 17.4 ms (float32 39.1 ms). A portable export (the
default on a CPU without VNNI, where U8S8 sums saturate, see :mod:`.int8_cpu`) has uint8 weights.
"""

import collections
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["CODES", "quantize_onnx", "tie_shift_qparams", "int8_cache_io", "concat_qparams", "qparams"]

CODES = "uint8"  # activations and so the online caches: onnxruntime's U8S8 (see above)

_CONSTANT_FILL = {"Expand", "ConstantOfShape", "Constant"}  # producers of a zero slot: no data of their own


def quantize_onnx(float_path: str, out_path: str, feeds: Iterable[dict[str, np.ndarray]],
                  cache_pairs: Sequence[tuple[str, str]] = (), portable: bool = False) -> dict[str, tuple[float, int]]:
    """``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, min/max) + the shift's rules.

    Args:
        float_path: the float32 ONNX graph.
        out_path: where the int8 graph goes (weights inside it).
        feeds: calibration inputs, one dict per run.
        cache_pairs: ``(input name, output name)`` of each online cache, made int8.
        portable: uint8 weights (U8U8), which no x86 kernel saturates, instead of int8 (U8S8).

    Returns:
        cache input name -> ``(scale, zero_point)`` (empty for the clip network).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(float_path, out_path, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8 if portable else QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    model = onnx.load(out_path)
    tie_shift_qparams(model)
    found = int8_cache_io(model, cache_pairs) if cache_pairs else {}
    _drop_unused_initializers(model)
    onnx.checker.check_model(model)
    onnx.save(model, out_path)
    return found


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Removes the qparams the shift's ties replaced (onnxruntime would warn about each one when loading)."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {v.name for v in [*model.graph.input, *model.graph.output]}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers = collections.defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.inputs = {i.name for i in self.graph.input}
        self.init = {t.name: t for t in self.graph.initializer}

    def value(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.init[name])


def qparams(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float, int]:
    """(scale, zero_point) of a QuantizeLinear/DequantizeLinear node with per-tensor initializers."""
    init = {t.name: t for t in model.graph.initializer}
    scale = numpy_helper.to_array(init[node.input[1]])
    zero = numpy_helper.to_array(init[node.input[2]]) if len(node.input) > 2 else np.zeros((), np.int8)
    return float(scale), int(zero)


def _share(node: onnx.NodeProto, source: onnx.NodeProto) -> None:
    node.input[1] = source.input[1]
    if len(source.input) > 2:
        if len(node.input) > 2:
            node.input[2] = source.input[2]
        else:
            node.input.append(source.input[2])


def _share_quantizer(g: _Graph, quant: onnx.NodeProto, source: onnx.NodeProto) -> None:
    """Gives a QuantizeLinear and every DequantizeLinear reading its codes the parameters of ``source``."""
    _share(quant, source)
    for user in g.consumers[quant.output[0]]:
        if user.op_type == "DequantizeLinear":
            _share(user, source)


def _tie_concat(g: _Graph, concat: onnx.NodeProto) -> None:
    dqs = [g.producer.get(i) for i in concat.input]
    if any(d is None or d.op_type != "DequantizeLinear" for d in dqs):
        return  # a float Concat: the quantizer left the shift unquantized, nothing to tie
    quants = [g.producer.get(d.input[0]) for d in dqs]
    moved = [q is not None and q.op_type == "QuantizeLinear" and (q.input[0] in g.inputs or (
        q.input[0] in g.producer and g.producer[q.input[0]].op_type in _CONSTANT_FILL)) for q in quants]
    sources = [d for d, m in zip(dqs, moved) if not m]
    if not sources:
        return
    source = sources[0]
    want = qparams(g.model, source)
    for dq, q, is_cache_or_fill in zip(dqs, quants, moved):
        if is_cache_or_fill:
            _share_quantizer(g, q, source)
        elif qparams(g.model, dq) != want:
            raise RuntimeError(f"Concat {concat.name!r}: input {dq.input[0]!r} is quantized at {qparams(g.model, dq)} "
                               f"and the shifted tensor at {want}; a shift joins slots of one tensor")
        _share(dq, source)
    for user in g.consumers[concat.output[0]]:
        if user.op_type == "QuantizeLinear":
            _share_quantizer(g, user, source)


def tie_shift_qparams(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gives every ``Concat``'s inputs, output quantizers, caches and zero slots its shifted input's qparams."""
    g = _Graph(model)
    for node in list(g.graph.node):
        if node.op_type == "Concat":
            _tie_concat(g, node)
    return model


def int8_cache_io(model: onnx.ModelProto, cache_pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[float, int]]:
    """Turns each cache input and output into 8-bit codes (the type of its quantizer's zero point);
    returns input name -> (scale, zero_point)."""
    g = _Graph(model)
    found = {}
    for cache_in, cache_out in cache_pairs:
        (quant,) = g.consumers[cache_in]
        if quant.op_type != "QuantizeLinear":
            raise RuntimeError(f"cache input {cache_in!r} feeds {quant.op_type}, not QuantizeLinear")
        found[cache_in] = qparams(model, quant)
        for user in list(g.consumers[quant.output[0]]):
            for k, name in enumerate(user.input):
                if name == quant.output[0]:
                    user.input[k] = cache_in
        g.graph.node.remove(quant)
        codes = g.init[quant.input[2]].data_type
        _set_type(g.graph.input, cache_in, codes)
        dequant = g.producer[cache_out]
        if dequant.op_type != "DequantizeLinear":
            raise RuntimeError(f"cache output {cache_out!r} comes from {dequant.op_type}, not DequantizeLinear")
        if qparams(model, dequant) != found[cache_in]:
            raise RuntimeError(f"cache {cache_in!r} is read at {found[cache_in]} but written at "
                               f"{qparams(model, dequant)}")
        g.producer[dequant.input[0]].output[0] = cache_out
        for user in g.consumers[dequant.input[0]]:
            if user is not dequant:
                user.input[list(user.input).index(dequant.input[0])] = cache_out
        g.graph.node.remove(dequant)
        _set_type(g.graph.output, cache_out, codes)
    return found


def _set_type(values, name: str, elem_type: int) -> None:
    for v in values:
        if v.name == name:
            v.type.tensor_type.elem_type = elem_type
            return
    raise KeyError(name)


def concat_qparams(model: onnx.ModelProto) -> list[dict]:
    """For each Concat: its inputs' and its output's (scale, zero_point) (None where a side is float)."""
    g = _Graph(model)
    rows = []
    for node in g.graph.node:
        if node.op_type != "Concat":
            continue
        ins = []
        for i in node.input:
            p = g.producer.get(i)
            ins.append(qparams(model, p) if p is not None and p.op_type == "DequantizeLinear" else
                       ("quantized input" if i in g.inputs else None))
        outs = [qparams(model, u) for u in g.consumers[node.output[0]] if u.op_type == "QuantizeLinear"]
        rows.append({"name": node.name, "inputs": ins, "outputs": outs})
    return rows


"""int8 for OpenVINO: NNCF's ``nncf.quantize`` on the OpenVINO model of the float ONNX graph.

NNCF inserts ``FakeQuantize`` ops where the CPU plugin runs int8 (inputs of convolutions,
matmuls, adds) and propagates them up through quantization-agnostic ops. For the shift this
is already the right graph: the quantizers meet at the shift's ``Concat``, which NNCF puts in
one *unified scale* group, so every slot of the shifted tensor, the online cache read and the
zero slot are quantized by FakeQuantize ops with identical ranges, one requantize-free int8
tensor from the Concat into the next layer. :func:`fake_quantize_ranges` reads those ranges
back so tests can check it. The caches stay float at the model's I/O (OpenVINO's FakeQuantize
is a float op the CPU plugin turns into int8 kernels); the cache read is quantized on entry by
the FakeQuantize of the tensor it joins, so the state the next frame computes with is the same
int8 codes as the clip network's shifted slot.
"""

from collections.abc import Sequence

import numpy as np

__all__ = ["quantize_openvino", "fake_quantize_ranges", "concat_ranges"]


def quantize_openvino(float_onnx: str, xml_path: str, feeds: Sequence[dict[str, np.ndarray]],
                      cache_inputs: Sequence[str] = ()) -> dict[str, tuple[float, int]]:
    """Quantizes ``float_onnx`` with NNCF on ``feeds`` and saves ``xml_path`` (+ ``.bin``).

    Returns cache input name -> (scale, zero_point) of the FakeQuantize that reads it.
    """
    import nncf
    import openvino as ov

    model = ov.convert_model(float_onnx)
    # The calibration shapes, static: the clip graph's dynamic clip count leaves shapes the CPU plugin
    # cannot reorder in the quantized graph ("Can not clone with new dims").
    model.reshape({name: list(array.shape) for name, array in feeds[0].items()})
    quantized = nncf.quantize(model, nncf.Dataset(list(feeds)), subset_size=len(feeds))
    ov.save_model(quantized, xml_path, compress_to_fp16=False)
    _check_compiles(ov, xml_path)
    found = {}
    for param in quantized.get_parameters():
        name = param.get_friendly_name()
        if name in cache_inputs:
            users = [t.get_node() for t in param.output(0).get_target_inputs()]
            fq = next((u for u in users if u.get_type_name() == "FakeQuantize"), None)
            if fq is None:
                raise RuntimeError(f"NNCF left cache input {name!r} unquantized (it feeds "
                                   f"{[u.get_type_name() for u in users]})")
            found[name] = _scale_zero(*fake_quantize_ranges(fq))
    return found


def _check_compiles(ov, xml_path: str) -> None:
    """Reads the saved IR back and compiles it for the CPU, so that a model the plugin rejects is never written."""
    try:
        ov.Core().compile_model(ov.Core().read_model(xml_path), "CPU")
    except RuntimeError as err:
        cause = next((line for line in str(err).splitlines() if "While validating" in line), str(err).splitlines()[0])
        raise RuntimeError(
            f"OpenVINO's CPU plugin cannot compile the int8 network NNCF made ({cause.strip()[:200]}). Hint: "
            "this is seen in the clip network when a shift site's activation is 1x1 pixel (MobileNetV2 below "
            "64 px); export with a larger --size, or the online step (it has no such reshape)."
        ) from err


def fake_quantize_ranges(fq) -> tuple[float, float, int]:
    """(input_low, input_high, levels) of a per-tensor FakeQuantize node."""
    low, high = (float(np.ravel(fq.input_value(i).get_node().get_data())[0]) for i in (1, 2))
    return low, high, int(fq.get_attributes()["levels"])


def _scale_zero(low: float, high: float, levels: int) -> tuple[float, int]:
    scale = (high - low) / (levels - 1)
    return scale, round(-low / scale) - levels // 2  # as int8 codes: the zero's code minus 128


def _leaves(op) -> list:
    """The inputs of a Concat, looking through nested Concats (the clip network's zero slot joins first)."""
    found = []
    for i in range(op.get_input_size()):
        node = op.input_value(i).get_node()
        kind = node.get_type_name()
        if kind == "Concat":
            found += _leaves(node)
        elif kind == "FakeQuantize":
            found.append(fake_quantize_ranges(node))
        elif kind == "Constant":
            found.append(("constant", float(np.abs(node.get_data()).max())))
        elif kind == "Broadcast" and node.input_value(0).get_node().get_type_name() == "Constant":
            found.append(("constant", float(np.abs(node.input_value(0).get_node().get_data()).max())))  # zero slot
        else:
            found.append((kind, None))
    return found


def concat_ranges(model) -> list[dict]:
    """For each outermost Concat (a shift): the FakeQuantize ranges of its slots, nested Concats flattened.

    A slot that is a constant appears as ``("constant", max |value|)``; any other unquantized
    producer as ``(type, None)``.
    """
    rows = []
    for op in model.get_ordered_ops():
        users = [t.get_node() for t in op.output(0).get_target_inputs()] if op.get_output_size() else []
        if op.get_type_name() != "Concat" or any(u.get_type_name() == "Concat" for u in users):
            continue
        consumers = [u.get_type_name() for u in users]
        rows.append({"name": op.get_friendly_name(), "slots": _leaves(op), "consumers": consumers})
    return rows

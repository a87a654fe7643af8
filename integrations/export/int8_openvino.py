"""int8 for OpenVINO: NNCF's ``nncf.quantize`` on the OpenVINO model of the folded float network.

Both forms are quantized from their folded graphs (``OnlineTSM.folded_step_module()`` and
``TSMNet.folded_module()``): each site's first convolution is split into the part reading the
moved slot (the cache online, the slot of the frame before in the clip network) and the rest, so
there is no channel split and concat of the activation, which the CPU plugin ran in reference
``VariadicSplit`` kernels, and both forms quantize the same split weights. NNCF inserts
``FakeQuantize`` ops where the CPU plugin runs int8 (inputs of convolutions, matmuls, adds).
Two settings and one rewrite make the online step and the clip network the same int8 network:

* activation ranges are the global min/max and every layer's weights the same range (8 bits, or
  7 in a portable export) (:func:`_nncf_settings`), so neither form's quantization depends on how its calibration data
  was cut into samples or on which layers read a model input (a cache);
* :func:`quantize_zero_slots` gives the clip network's zero frame of the moved slot the
  FakeQuantize of the frames it joins, made from data, so the layer reading it runs in int8.

:func:`fake_quantize_ranges` reads the ranges back so tests can check them. The caches stay float
at the model's I/O (OpenVINO's FakeQuantize is a float op the CPU plugin turns into int8 kernels)
and are quantized on entry by the FakeQuantize of the slot's layer.
"""

from collections.abc import Sequence

import numpy as np

__all__ = ["quantize_openvino", "quantize_zero_slots", "fake_quantize_ranges", "concat_ranges"]


def quantize_openvino(float_model: str, xml_path: str, feeds: Sequence[dict[str, np.ndarray]],
                      cache_inputs: Sequence[str] = (), portable: bool = False) -> dict[str, tuple[float, int]]:
    """Quantizes ``float_model`` (ONNX or IR) with NNCF on ``feeds`` and saves ``xml_path`` (+ ``.bin``).

    ``portable``: 7-bit weights in every layer (NNCF's overflow fix), which CPUs without VNNI run
    without saturating; otherwise the full 8-bit range.

    Returns cache input name -> (scale, zero_point) of the FakeQuantize that reads it.
    """
    import nncf
    import openvino as ov

    model = ov.Core().read_model(float_model)
    # The calibration shapes, static: the clip graph's dynamic clip count leaves shapes the CPU plugin
    # cannot reorder in the quantized graph ("Can not clone with new dims").
    model.reshape({name: list(array.shape) for name, array in feeds[0].items()})
    quantized = nncf.quantize(model, nncf.Dataset(list(feeds)), subset_size=len(feeds),
                              advanced_parameters=_nncf_settings(portable))
    quantize_zero_slots(quantized)
    ov.save_model(quantized, xml_path, compress_to_fp16=False)
    _check_compiles(ov, xml_path)
    found = {}
    for param in quantized.get_parameters():
        name = param.output(0).get_any_name()
        if name in cache_inputs:
            users = [t.get_node() for t in param.output(0).get_target_inputs()]
            fq = next((u for u in users if u.get_type_name() == "FakeQuantize"), None)
            if fq is None:
                raise RuntimeError(f"NNCF left cache input {name!r} unquantized (it feeds "
                                   f"{[u.get_type_name() for u in users]})")
            found[name] = _scale_zero(*fake_quantize_ranges(fq))
    return found


def _nncf_settings(portable: bool = False):
    """NNCF's settings under which the clip network and the online step quantize alike.

    * ``MINMAX`` activation ranges: NNCF's default for per-tensor activations averages each
      sample's min and max, so a range depended on the samples, a clip for the clip network and
      a frame for the step; the global min/max is the same however the frames are grouped.
    * The overflow fix on every layer or on none: NNCF's default halves the weight range of the
      first convolution after each model input, and every cache is a model input, so each site's
      first layer got 7-bit weights in the step and 8-bit ones in the clip network. The full range
      is right for CPUs with VNNI or AMX; on x86 CPUs without VNNI int8 convolutions may saturate,
      and ``portable`` halves every layer's range (see :mod:`.int8_cpu`).

    NNCF's default fast bias correction stays: it corrects each bias from the mean of the layer's
    input, which is the same in both forms (its slower ``BiasCorrection`` is not: the two forms'
    biases then differed by about 1e-3, enough to flip codes).

    Measured with :func:`quantize_zero_slots`, int8 stream against int8 clip network: a four-block
    ResNet from 2-5% of the logits' spread to exactly equal; a random MobileNetV2 (64 px) from 7-8%
    to 3-4%, less than its int8 clip network moves under a 1e-4 relative change of its input (7-9%).
    """
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                                          overflow_fix=OverflowFix.ENABLE if portable else OverflowFix.DISABLE)


def _is_zero_fill(node) -> bool:
    """A Constant of zeros, or a Broadcast or Convert of one (the zero slot of a shift)."""
    while node.get_type_name() in ("Broadcast", "Convert"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant" and not np.any(node.get_data())


def quantize_zero_slots(model) -> int:
    """Quantizes each shift's zero slot like the slot it joins, from data; returns how many.

    NNCF puts a FakeQuantize on the data inputs of a ``Concat`` but not on a constant one, and the
    CPU plugin folds a FakeQuantize of a constant into a float constant anyway; a Concat with a
    float input then runs in float, and so does the convolution that reads it (every site's first
    layer in the clip network), while the online step's zero cache is a model input and stays int8.
    The zero slot becomes ``FakeQuantize(slice of the joined slot * 0)`` with the joined slot's
    ranges: the quantized zero, computed from data so the plugin keeps it in int8. It also removes
    a compile failure of the plugin at shift sites of 1x1 pixel (MobileNetV2's last stage below
    64 px: a Concat whose input shape it re-inferred wrongly).
    """
    from openvino import opset13 as ops

    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Concat" or not op.get_output_element_type(0).is_real():
            continue
        sources = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        fq = next((s for s in sources if s.get_type_name() == "FakeQuantize"), None)
        if fq is None:
            continue
        axis = op.get_attributes()["axis"]
        for i, source in enumerate(sources):
            length = source.get_output_partial_shape(0).to_shape()[axis]
            if not _is_zero_fill(source) or length > fq.get_output_partial_shape(0).to_shape()[axis]:
                continue
            first = ops.slice(fq.input_value(0), [0], [length], [1], [axis])
            zeros = ops.multiply(first, ops.constant(np.zeros((), np.float32)))
            ranges = [fq.input_value(k) for k in range(1, 5)]
            quantized = ops.fake_quantize(zeros, *ranges, fq.get_attributes()["levels"])
            op.input(i).replace_source_output(quantized.output(0))
            done += 1
    return done


def _check_compiles(ov, xml_path: str) -> None:
    """Reads the saved IR back and compiles it for the CPU, so that a model the plugin rejects is never written."""
    try:
        ov.Core().compile_model(ov.Core().read_model(xml_path), "CPU")
    except RuntimeError as err:
        cause = next((line for line in str(err).splitlines() if "While validating" in line), str(err).splitlines()[0])
        raise RuntimeError(
            f"OpenVINO's CPU plugin cannot compile the int8 network NNCF made ({cause.strip()[:200]}). Hint: "
            "export this network without --int8 (float32), or int8 with --target onnx."
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
    """For each outermost Concat of activations (a shift): the FakeQuantize ranges of its slots, nested
    Concats flattened.

    A slot that is a constant appears as ``("constant", max |value|)``; any other unquantized
    producer as ``(type, None)``.
    """
    rows = []
    for op in model.get_ordered_ops():
        users = [t.get_node() for t in op.output(0).get_target_inputs()] if op.get_output_size() else []
        if op.get_type_name() != "Concat" or any(u.get_type_name() == "Concat" for u in users):
            continue
        if not op.get_output_element_type(0).is_real():  # a shape computed for a Reshape, not activations
            continue
        consumers = [u.get_type_name() for u in users]
        rows.append({"name": op.get_friendly_name(), "slots": _leaves(op), "consumers": consumers})
    return rows

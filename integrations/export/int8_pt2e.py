"""int8 through PyTorch's PT2E flow: ``torch.export`` -> ``prepare_pt2e`` -> calibrate -> ``convert_pt2e``.

The quantizer is ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric int8 weights, per-tensor
affine int8 activations) with two changes, both for the temporal shift:

* the shift's data-movement ops (``narrow``/``slice``, ``cat``, ``zeros_like``, ``clone``, views;
  :data:`SHARED_QPARAM_OPS`) share the quantization parameters of the tensor they move, as
  ``SharedQuantizationSpec``: the shifted tensor, the zero slot, the online cache read and the
  new cache written all have the input's scale and zero point, so the shift is a permutation of
  int8 codes with the zero point in the empty slot, and no observer ever sees a zero-filled slot
  alone (the zeros are observed together with the tensor they pad, whose range contains 0 anyway);
* activations are observed with ``MinMaxObserver`` rather than the stock ``HistogramObserver``:
  a min/max range depends only on the set of values seen, not on how they were batched, so the
  clip network (a clip per call) and the online step (a frame per call) calibrated on the same
  clips get the same scales, and the int8 stream matches the int8 clip network.

The result runs in PyTorch (the reference quantized model: int8 codes, float arithmetic between
quantize/dequantize pairs) or lowers to ExecuTorch with the XNNPACK partitioner; there the caches
are the program's int8 inputs and outputs (``QuantizeInputs``/``QuantizeOutputs``).
"""

from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from .executorch import default_sigchld

__all__ = ["SHARED_QPARAM_OPS", "ShiftAwareXNNPACKQuantizer", "quantize_module", "to_executorch", "qparams_of"]

_aten = torch.ops.aten
# Ops that only move, copy or zero-fill values: exact in int8 when their output keeps the input's
# quantization parameters. The first tensor argument is the input (for cat: the first input that
# is not a graph input, so an online cache takes the activation's parameters, not the reverse).
SHARED_QPARAM_OPS = {
    _aten.narrow.default: "the shift reads one channel slot / frame range",
    _aten.slice.Tensor: "narrow after decomposition",
    _aten.slice_copy.Tensor: "slice in the edge dialect",
    _aten.cat.default: "the shift joins the moved slot, the zero slot and the rest",
    _aten.zeros_like.default: "the empty slot at a clip's first frame: the quantized zero",
    _aten.clone.default: "the online new cache is a copy of this frame's slot",
    _aten.reshape.default: "clips (N*T, ...) viewed as (N, T, ...) and back",
    _aten.view.default: "as reshape",
    _aten.constant_pad_nd.default: "a zero pad along time, if a shift is written that way",
}
_ANNOTATION = "quantization_annotation"


def _activation_config():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import QuantizationConfig
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    stock = get_symmetric_quantization_config(is_per_channel=True)
    act = stock.input_activation
    minmax = QuantizationSpec(dtype=act.dtype, quant_min=act.quant_min, quant_max=act.quant_max, qscheme=act.qscheme,
                              observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    return QuantizationConfig(minmax, minmax, stock.weight, stock.bias, stock.is_qat)


def _quantizer_class():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class _ShiftAware(XNNPACKQuantizer):
        def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
            model = super().annotate(model)
            share_shift_qparams(model)
            return model

    _ShiftAware.__name__ = _ShiftAware.__qualname__ = "ShiftAwareXNNPACKQuantizer"
    return _ShiftAware


def ShiftAwareXNNPACKQuantizer():
    """The XNNPACK quantizer with the shift's ops sharing their input's qparams and min/max activation ranges."""
    return _quantizer_class()().set_global(_activation_config())


def _source(node: fx.Node) -> fx.Node | None:
    args = node.args[0] if node.target == _aten.cat.default else node.args[:1]
    inputs = [a for a in args if isinstance(a, fx.Node)]
    if not inputs:
        return None
    return next((i for i in inputs if i.op != "placeholder"), inputs[0])


def share_shift_qparams(model: fx.GraphModule) -> None:
    """Annotates every :data:`SHARED_QPARAM_OPS` node to use the quantization parameters of its source.

    Replaces what the stock annotator did for these nodes (its ``cat`` rule may take a graph input,
    an online cache, as the source, and ``narrow``/``clone``/``zeros_like`` it leaves in float).
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in SHARED_QPARAM_OPS:
            continue
        source = _source(node)
        if source is None:
            continue
        spec = SharedQuantizationSpec(source)
        inputs = node.args[0] if node.target == _aten.cat.default else [source]
        node.meta[_ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={i: spec for i in inputs if isinstance(i, fx.Node)}, output_qspec=spec, _annotated=True)


def _contiguous(args: tuple) -> tuple:
    """``args`` with every tensor in the default (NCHW) memory format.

    ``torch.export`` records each input's memory format (dim order) in the program: an ExecuTorch
    program exported from a channels_last example takes channels_last inputs and reads a contiguous
    buffer (what the runtime and ``_check_lowering`` feed) as if it were one, silently; and with
    ``to_edge`` + ``to_backend`` a channels_last int8 graph splits around ops XNNPACK does not take
    (``max_pool2d_with_indices``, the shift's ``full_like``) into delegates whose int8 channels_last
    inputs XNNPACK's ``ChannelsLastTaggedReshapePass`` misreads (it tests ``meta["val"][0]``, a
    3-D slice, for channels_last). Clips decoded by MMAction2's pipeline are channels_last views.
    """
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def quantize_module(module: nn.Module, example_args: tuple, calibrate: Callable[[nn.Module], None]) -> fx.GraphModule:
    """PT2E static int8 of ``module``: export, annotate, calibrate with ``calibrate(prepared)``, convert.

    Returns the converted graph module; it runs in PyTorch and takes the same arguments. It is
    exported from contiguous copies of ``example_args``: a channels_last example would bake the
    shift's channels_last form (permutes around it) into the graph.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(module.eval(), _contiguous(example_args)).module()
    prepared = prepare_pt2e(exported, ShiftAwareXNNPACKQuantizer())
    with torch.no_grad():
        calibrate(prepared)
    return convert_pt2e(prepared)


def qparams_of(quantized: fx.GraphModule, output_index: int | None = None, input_index: int | None = None
               ) -> tuple[float, int]:
    """(scale, zero_point) of the quantize op on graph input ``input_index`` or output ``output_index``."""
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    if input_index is not None:
        node = [n for n in quantized.graph.nodes if n.op == "placeholder"][input_index]
        q = next(u for u in node.users if u.target == quantize)
        return float(q.args[1]), int(q.args[2])
    out = next(n for n in quantized.graph.nodes if n.op == "output").args[0][output_index]
    while out.target != quantize:
        out = out.args[0]
    return float(out.args[1]), int(out.args[2])


@default_sigchld()
def to_executorch(quantized: fx.GraphModule, example_args: tuple, path: str, int8_inputs: Sequence[int] = (),
                  int8_outputs: Sequence[int] = ()) -> dict:
    """Lowers a converted PT2E module to an ExecuTorch ``.pte`` with XNNPACK; returns the int8 I/O qparams.

    ``int8_inputs``/``int8_outputs``: graph inputs/outputs the program takes/returns as int8 codes
    (the online caches) instead of float; their ``(scale, zero_point)`` are returned under
    ``"inputs"`` and ``"outputs"`` keyed by index.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge
    from executorch.exir.passes.quantize_io_pass import QuantizeInputs, QuantizeOutputs

    # the program takes contiguous (NCHW) inputs, as the runtime feeds them, whatever the example's layout
    edge = to_edge(torch.export.export(quantized, _contiguous(example_args)))
    passes = []
    if int8_inputs:
        passes.append(QuantizeInputs(edge, list(int8_inputs)))
    if int8_outputs:
        passes.append(QuantizeOutputs(edge, list(int8_outputs)))
    if passes:
        edge = edge.transform(passes)
    program = edge.to_backend(XnnpackPartitioner()).to_executorch()
    with open(path, "wb") as f:
        f.write(program.buffer)
    found = {"inputs": {}, "outputs": {}}
    for p in passes:
        key = "inputs" if isinstance(p, QuantizeInputs) else "outputs"
        args = p.quant_args if key == "inputs" else p.dequant_args
        found[key] = {i: (float(a[0]), int(a[1])) for i, a in args.items()}
    return found


"""OpenVINO target of ``tsm-surgery export``: the network as OpenVINO IR (``.xml`` graph, ``.bin`` weights).

The torch.export'ed program goes through ``openvino.convert_model`` and is saved with float32
weights (``compress_to_fp16=False``). The online step is exported in its folded form
(``OnlineTSM.folded_step_module``: each shift folded into its branch's first layer; the sidecar's
``folded_sites`` lists them), which the CPU plugin runs faster than a channel split and concat.
Inputs and outputs carry the sidecar's names (``frames``, ``cache_<i>`` -> ``output``,
``new_cache_<i>``; ``clips`` -> ``output``). The precision is a
run-time choice of the CPU plugin (``INFERENCE_PRECISION_HINT``): its default on a CPU with
bfloat16 units is bf16, about 0.2 off float32 on a random MobileNetV2, so the sidecar records
the precision asked for (``f32`` unless told) and :mod:`.runtime` compiles with it.

Example::

    tsm-surgery export --target openvino --model timm:mobilenetv2_100 --online --output mbv2.xml
"""

from typing import Any

from torch import nn

import tsm_surgery

from .artifacts import offline_example, offline_io, online_example, online_io, require, sidecar_path, torch_export

__all__ = ["export_online", "export_offline", "output_files", "write", "PRECISIONS"]

# --precision -> the CPU plugin's INFERENCE_PRECISION_HINT
PRECISIONS = {"f32": "f32", "bf16": "bf16"}


def write(module: nn.Module, args: tuple, path: str, input_names: list[str], output_names: list[str]) -> None:
    """Saves ``module`` traced on ``args`` as OpenVINO IR at ``path`` (``.xml``; weights in ``.bin``)."""
    ov = require("openvino", "openvino")
    model = ov.convert_model(torch_export(module, args))
    # convert_model leaves every dimension dynamic; the export's shapes are fixed (static shapes also run faster).
    model.reshape({port: ov.PartialShape(list(a.shape)) for port, a in zip(model.inputs, args)})
    for port, name in zip(model.inputs, input_names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, output_names):
        port.get_tensor().set_names({name})
    ov.save_model(model, path, compress_to_fp16=False)


def export_online(online: "tsm_surgery.OnlineTSM", path: str, batch_size: int = 1,
                  frame_shape: tuple[int, int, int] = (3, 224, 224)) -> dict[str, Any]:
    """Exports the explicit-state step; returns the sidecar's ``inputs``/``outputs``/``state``."""
    frames, state, out = online_example(online, batch_size, frame_shape)
    io = online_io(frames, state, out)
    # The CPU plugin runs each site's channel split and concat as a VariadicSplit with layout reorders;
    # folded into the branch's first layer, the ResNet-50 step ran at 1.22x the 2D frame instead of 1.36x.
    step = online.folded_step_module()
    write(step, (frames, *state.values()), path, [i["name"] for i in io["inputs"]], [o["name"] for o in io["outputs"]])
    return {**io, "folded_sites": step.folded_sites}


def export_offline(net: "tsm_surgery.TSMNet", path: str, frame_shape: tuple[int, int, int] = (3, 224, 224),
                   clips: int = 1) -> dict[str, Any]:
    """Exports the clip network for ``clips`` clips of ``net.n_segments`` frames (a fixed batch)."""
    x, out = offline_example(net, frame_shape, clips)
    write(net, (x,), path, ["clips"], ["output"])
    return offline_io(x, out, net.n_segments, dynamic=False)


def output_files(path: str) -> list[tuple[str, str]]:
    """``(path, role)`` of every file an OpenVINO export writes for IR path ``path`` (``*.xml``)."""
    if not path.endswith(".xml"):
        raise ValueError(f"--output {path}: OpenVINO IR is an .xml graph with a .bin beside it; name it *.xml.")
    return [(path, "the OpenVINO IR graph"), (path[:-4] + ".bin", "its weights"),
            (sidecar_path(path), "the JSON sidecar naming inputs, outputs and caches")]

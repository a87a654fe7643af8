"""``tsm-surgery export``: a TSM network for a CPU runtime (ONNX, OpenVINO, ExecuTorch) with one JSON sidecar.

The network is ``--model`` (timm/torchvision, converted with the shift arguments) or ``--config``
(a trained MMAction2 recognizer: backbone, pooling and classifier, per frame, with the config's
shift, frame size and normalisation). Two forms:

* ``--online`` (default): the explicit-state step of :func:`tsm_surgery.to_online`. Inputs are
  ``frames`` ``(B, C, H, W)`` and one cache per shift site; outputs are ``output`` and the new
  caches. Feed each output cache back as the matching input at the next frame; start from
  zeros. The sidecar lists the pairs (``state``) with their shapes.
* ``--offline``: the converted clip network, input ``clips`` ``(N*T, C, H, W)``; ONNX keeps ``N``
  dynamic, OpenVINO and ExecuTorch fix it (``--clips``).

``--int8`` writes the static int8 network instead, calibrated on ``--calibration`` (a folder of
videos or an MMAction2 data config; default the demo's synthetic videos) with the runtime's own
quantizer; the sidecar gives each cache its int8 dtype, scale and zero point (docs/deploy.md).

:func:`tsm_surgery.integrations.export.load` runs the result; ``tsm-surgery stream --engine`` streams it.

Example::

    tsm-surgery export --model timm:mobilenetv2_100 --online --size 224 --output mbv2_online.onnx
    tsm-surgery export --target openvino --model timm:mobilenetv2_100 --checkpoint tsm_uni.pth --output mbv2.xml
    tsm-surgery export --target executorch --model timm:resnet50 --offline --n-segments 8 --output r50.pte
    tsm-surgery export --target onnx --model timm:mobilenetv2_100 --checkpoint tsm_uni.pth --int8 --output m8.onnx
    tsm-surgery export --target openvino --config tsm_uni.py --checkpoint epoch_50.pth --output tsm.xml
"""

import argparse
import os
import sys
import time

import torch

import tsm_surgery
from tsm_surgery.cli import positive_int
from tsm_surgery.integrations.checkpoints import check_checkpoint_layout, read_state_dict, shift_for_checkpoint
from tsm_surgery.integrations.checkpoints.loading import cli_log
from tsm_surgery.integrations.export import SUFFIX, TARGETS, export_int8_set, export_set, target_module
from tsm_surgery.integrations.export.artifacts import require_target
from tsm_surgery.integrations.models import build_model, default_frame_size
from tsm_surgery.integrations.outputs import claim_outputs

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    network = parser.add_mutually_exclusive_group(required=True)
    network.add_argument("--model", help="timm:NAME or torchvision:NAME (random weights unless --checkpoint)")
    network.add_argument("--config", help="an MMAction2 config whose backbone is a TSMSurgeryBackbone (or a "
                         "TSMSurgery* stock type); with --checkpoint its trained recognizer: backbone, pooling and "
                         "classifier, logits per frame")
    parser.add_argument("--target", choices=TARGETS, default="onnx",
                        help="runtime: onnx (onnxruntime; default), openvino (IR .xml/.bin, CPU plugin) or "
                             "executorch (.pte, XNNPACK)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--online", dest="online", action="store_true", default=True,
                      help="export the one-frame step with explicit caches (default; direction uni)")
    form.add_argument("--offline", dest="online", action="store_false",
                      help="export the clip network, input (N*T, C, H, W)")
    parser.add_argument("--n-segments", type=positive_int, help="frames per clip T (offline; default 8)")
    parser.add_argument("--shift-div", type=positive_int, help="1/shift_div of the channels move (default 8)")
    parser.add_argument("--direction", choices=("bi", "uni"),
                        help="offline only; default bi (online is always uni)")
    parser.add_argument("--uni-slot", choices=("past", "first"),
                        help="with a uni shift: channels read from the previous frame: 'past' = [fold, 2*fold) "
                             "(default), 'first' = [0, fold) as the paper's online demo (default for its checkpoint)")
    parser.add_argument("--checkpoint", help="2D or converted state_dict (--model) or MMAction2 checkpoint "
                        "(--config), loaded strictly with weights_only=True")
    parser.add_argument("--num-classes", type=positive_int, help="classifier size (default: the model's own)")
    parser.add_argument("--size", type=positive_int, help="frame height and width (default: the model's input size)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="streams per step (online; default 1)")
    parser.add_argument("--clips", type=positive_int, default=1,
                        help="clips per call of the offline network for openvino/executorch (fixed; default 1)")
    parser.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                        help="openvino: the CPU plugin's inference precision the runner uses (default f32; "
                             "bf16 runs on bfloat16 units, about 1e-1 off)")
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                        help="onnx: torch.onnx exporter, dynamo (torch.export based, default) or legacy (TorchScript)")
    parser.add_argument("--int8", action="store_true",
                        help="static post-training int8 quantization with the runtime's own tool (onnxruntime "
                             "quantize_static QDQ, NNCF, PT2E + XNNPACK), calibrated on --calibration")
    parser.add_argument("--calibration", metavar="VIDEO_DIR_OR_DATA_CONFIG",
                        help="videos for --int8 calibration: a folder of videos or an MMAction2 data config "
                             "(default: the demo's synthetic videos; pass the --config itself for its own data)")
    parser.add_argument("--int8-portable", action=argparse.BooleanOptionalAction, default=None,
                        help="--int8 weights that x86 CPUs without VNNI run without saturating (onnxruntime uint8 "
                             "weights, OpenVINO 7-bit weights); default: on exactly when this CPU has no VNNI")
    parser.add_argument("--output", help="artifact path (default: <model>_<online|offline><suffix>, suffix .onnx, "
                        ".xml or .pte); the sidecar is the same path with .json, ONNX weights go to <output>.data, "
                        "OpenVINO weights to .bin")
    parser.add_argument("--force", action="store_true", help="replace existing output files (all of them)")


# Set by an MMAction2 config's backbone; given with --config they would silently disagree with it.
_FIXED_BY_CONFIG = ("n_segments", "shift_div", "direction", "uni_slot", "num_classes")


def _check(args: argparse.Namespace) -> None:
    if args.config:
        given = [f"--{k.replace('_', '-')}" for k in _FIXED_BY_CONFIG if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: with --config the config's backbone and head fix these; drop "
                             "them (or edit the config).")
    if args.uni_slot and (args.direction == "bi" or (not args.online and args.direction is None)):
        raise ValueError("--uni-slot applies to a uni shift: use it with --online or --direction uni.")
    if args.online and args.direction == "bi":
        raise ValueError("--direction bi: --online needs the uni-directional shift (a bi network reads "
                         "future frames); drop --direction bi or use --offline.")
    if args.calibration and not args.int8:
        raise ValueError("--calibration is for --int8; add --int8 or drop --calibration.")
    if args.int8_portable is not None and not args.int8:
        raise ValueError("--int8-portable is for --int8; add --int8 or drop it.")
    if args.int8 and args.batch_size != 1:
        raise ValueError(f"--batch-size {args.batch_size}: the int8 online step takes one stream; drop --batch-size.")
    if args.int8 and args.precision != "f32":
        raise ValueError(f"--precision {args.precision}: an --int8 export runs int8; drop --precision.")
    if args.calibration and not os.path.exists(args.calibration):
        raise FileNotFoundError(f"--calibration {args.calibration}: no such directory or config; pass a folder of "
                                "videos or an MMAction2 data config, or drop it for the demo data.")
    if args.precision != "f32" and args.target != "openvino":
        raise ValueError(f"--precision {args.precision}: only --target openvino chooses a precision at run time.")


def run(args: argparse.Namespace) -> int:
    _check(args)
    form = "online" if args.online else "offline"
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.model.split(":")[-1]
    path = args.output or f"{name}_{form}{SUFFIX[args.target]}"
    # A wrong suffix, a missing runtime or an existing file fails before the model is built.
    outputs = target_module(args.target).output_files(path)
    require_target(args.target)
    if not args.force:
        claim_outputs(outputs, force=False)
    if not args.checkpoint:
        print("tsm-surgery export: note: no --checkpoint, so the exported network has random weights; pass "
              "--checkpoint FILE for trained ones", file=sys.stderr)
    start = time.perf_counter()
    net, frame_shape, metadata = _network_of_config(args) if args.config else _network_of_model(args)
    if args.int8:
        _export_int8(args, net, path, frame_shape, metadata)
    else:
        network = tsm_surgery.to_online(net, frame_shape=frame_shape, inplace=True) if args.online else net
        export_set(args.target, network, path, frame_shape=frame_shape, batch_size=args.batch_size,
                   clips=args.clips, precision=args.precision, exporter=args.exporter, force=args.force,
                   metadata=metadata)
    written = [p for p, _ in outputs if os.path.exists(p)]
    kind = f"{args.target} int8" if args.int8 else args.target
    print(f"wrote {', '.join(written)} ({kind}, {form}, {len(net.sites)} shift sites, "
          f"{time.perf_counter() - start:.1f} s); they belong together")
    return 0


def _network_of_model(args: argparse.Namespace) -> tuple["tsm_surgery.TSMNet", tuple[int, int, int], dict]:
    """``--model``: the timm/torchvision model with ``--checkpoint``, converted with the shift arguments."""
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = build_model(args.model, checkpoint=args.checkpoint, **kwargs).eval()
    size = args.size or default_frame_size(model)
    frame_shape = (3, size, size)
    n_segments, shift_div = args.n_segments or 8, args.shift_div or 8
    direction = "uni" if args.online else (args.direction or "bi")
    weights = read_state_dict(args.checkpoint)[0] if args.checkpoint else None  # read once for both checks
    direction, slot = shift_for_checkpoint(weights, direction, args.uni_slot, "--checkpoint", log=cli_log)
    net = tsm_surgery.convert(model, n_segments, shift_div=shift_div, direction=direction,
                              uni_slot=slot, example_input=torch.randn((1,) + frame_shape), inplace=True)
    check_checkpoint_layout(weights, net, "--checkpoint", log=cli_log)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return net, frame_shape, {
        "model": args.model, "checkpoint": args.checkpoint, "shift_div": shift_div, "direction": direction,
        "slot": slot, "n_segments": None if args.online else n_segments, "input_size": size,
        "preprocess": {"size": size, "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
                       "std": list(cfg.get("std", (0.229, 0.224, 0.225))), "scale": "RGB in [0, 1]"},
    }


def _network_of_config(args: argparse.Namespace) -> tuple["tsm_surgery.TSMNet", tuple[int, int, int], dict]:
    """``--config``: the recognizer with ``--checkpoint`` as one per-frame network, its settings the config's."""
    try:
        from tsm_surgery.integrations.mmaction import recognizer as mm
    except ImportError as err:
        raise ImportError(f"--config needs MMAction2 ({err}). "
                          "Install the extras: pip install 'tsm_surgery[mmaction]'.") from None
    flag = f"--config {args.config}"
    recognizer = mm.load_recognizer(args.config, args.checkpoint, flag)
    size = args.size or mm.frame_size(recognizer)
    frame_shape = (3, size, size)
    net = mm.frame_classifier(recognizer, frame_shape, flag)
    if args.online and net.direction != "uni":
        raise ValueError(f"{flag}: the backbone shifts direction='bi' (it reads future frames), so it has no "
                         "online step; export it with --offline, or train a config with direction='uni'.")
    mean, std, to_rgb = mm.normalization(recognizer)
    return net, frame_shape, {
        "config": args.config, "checkpoint": args.checkpoint, "shift_div": net.shift_div, "direction": net.direction,
        "slot": net.uni_slot, "n_segments": None if args.online else net.n_segments, "input_size": size,
        # MMAction2 normalises 0-255 values; the sidecar's statistics are on the [0, 1] scale like --model's.
        "preprocess": {"size": size, "mean": [round(m / 255, 7) for m in mean], "std": [round(v / 255, 7) for v in std],
                       "scale": "RGB in [0, 1]", "flip_channels": to_rgb},
    }


def _export_int8(args: argparse.Namespace, net: "tsm_surgery.TSMNet", path: str, frame_shape: tuple[int, int, int],
                 metadata: dict) -> None:
    """Calibrates on decoded clips (preprocessed as the sidecar says) and writes the int8 set."""
    from tsm_surgery.integrations.streaming.calibration import load_calibration

    pre = metadata["preprocess"]
    clips = load_calibration(args.calibration, size=frame_shape[-1], n_frames=net.n_segments,
                             mean=pre["mean"], std=pre["std"], flip_channels=pre.get("flip_channels", False))
    metadata = {**metadata, "calibration": args.calibration or "demo data (tsm-surgery synth-data)",
                "calibration_clips": len(clips)}
    export_int8_set(args.target, net, path, clips, frame_shape=frame_shape, online=args.online, force=args.force,
                    metadata=metadata, portable=args.int8_portable)

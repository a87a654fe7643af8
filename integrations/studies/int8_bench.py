"""int8 against float32 latency of the same online step, per runtime, side by side in one process.

For each model and runtime the float32 step and the int8 step (:func:`.int8.quantize`) run on
the same frames, alternating call by call so neither gets the warmer cache; the figure is the
median of the per-frame ratios int8 / float32 (target on a CPU with AVX-512 VNNI: <= 0.6).

Example::

    python -m tsm_surgery.integrations.studies.int8_bench --models timm:mobilenetv2_100 timm:resnet50 --size 224
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import tsm_surgery
from tsm_surgery.integrations.export import int8
from tsm_surgery.integrations.models import build_model
from tsm_surgery.integrations.streaming.calibration import load_calibration

__all__ = ["compare", "main"]


def _float_runner(target: str, net, frame_shape, tmp: str, threads: int):
    """The float32 step of ``net`` in ``target``, from the same float graph the int8 route starts from."""
    path, _, _ = int8._float_onnx(net, [], frame_shape, "online", tmp)
    if target == "onnx":
        return int8.load(int8.Int8Artifact("onnx", "online", [path], frame_shape), threads)
    if target == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(ov.convert_model(path), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        return lambda *xs: [np.array(v) for v in request.infer(list(xs)).values()]
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    online = tsm_surgery.to_online(net, frame_shape=frame_shape)
    state = list(online.init_state(1, frame_shape=frame_shape).values())
    program = to_edge_transform_and_lower(torch.export.export(online.step_module, (torch.zeros(1, *frame_shape),
                                                                                  *state)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    pte = os.path.join(tmp, "float.pte")
    with open(pte, "wb") as f:
        f.write(program.buffer)
    return int8.load(int8.Int8Artifact("executorch", "online", [pte], frame_shape))


def _paired(float_run, int8_run, float_caches, int8_caches, frames) -> float:
    ratios = []
    for i, frame in enumerate(frames):
        times = {}
        for which in ((0, 1) if i % 2 else (1, 0)):
            run, caches = (float_run, float_caches) if which == 0 else (int8_run, int8_caches)
            start = time.perf_counter()
            run(frame, *caches)
            times[which] = time.perf_counter() - start
        if i >= 3:  # warm-up
            ratios.append(times[1] / times[0])
    return statistics.median(ratios)


def compare(models: list[str], size: int, targets=int8.TARGETS, frames: int = 40, threads: int = 2,
            calibration_clips: int = 4) -> list[dict]:
    """Per model and target: median int8/float32 latency ratio of the online step (``size`` px frames)."""
    frame_shape = (3, size, size)
    clips = load_calibration(None, size=size, n_frames=8, max_clips=calibration_clips)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, *frame_shape)).astype(np.float32) for _ in range(frames)]
    rows = []
    for spec in models:
        model = build_model(spec).eval()
        net = tsm_surgery.convert(model, 8, direction="uni", example_input=torch.zeros(1, *frame_shape))
        for target in targets:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                art = int8.quantize(target, net, clips, os.path.join(tmp, "int8_step"), frame_shape)
                quantize_s = time.perf_counter() - start
                float_run = _float_runner(target, net, frame_shape, tmp, threads)
                int8_run = int8.load(art, threads)
                float_caches = [np.zeros(c["shape"], np.float32) for c in art.caches]
                ratio = _paired(float_run, int8_run, float_caches, art.zero_caches(), inputs)
            rows.append({"model": spec, "target": target, "int8_over_float32": ratio, "quantize_s": quantize_s})
            print(f"{spec:24s} {target:10s} int8/float32 = {ratio:.2f}x  (quantized in {quantize_s:.0f} s)",
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["timm:mobilenetv2_100", "timm:resnet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--targets", nargs="+", default=list(int8.TARGETS), choices=int8.TARGETS)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    compare(args.models, args.size, args.targets, args.frames, args.threads)
    print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

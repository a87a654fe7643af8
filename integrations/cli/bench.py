"""``tsm-surgery bench``: the arguments, their ``--quick`` and ``--device`` resolution, and the run."""

import argparse
import dataclasses

import torch

from tsm_surgery.integrations.studies.bench.report import write
from tsm_surgery.integrations.studies.bench.running import DTYPES, Settings, run_bench

__all__ = ["add_arguments", "run", "settings_from_args", "QUICK"]

# --quick: a small configuration for tests and CI; flags given explicitly still win.
QUICK = dict(model="mmaction:resnet18", frames=4, clips=1, eval_size=32, train_size=32, online_size=32,
             rounds=3, repeats=1, op_repeats=3, convert_model="torchvision:resnet18", convert_repeats=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--model", default=d.model,
                        help="mmaction:resnetNN (adds MMAction2's ResNetTSM as a peer), timm:NAME or "
                             f"torchvision:NAME (default {d.model})")
    parser.add_argument("--frames", type=int, default=d.frames,
                        help=f"frames per clip, n_segments (default {d.frames})")
    parser.add_argument("--clips", type=int, default=d.clips, help=f"clips per batch (default {d.clips})")
    parser.add_argument("--eval-size", type=int, default=d.eval_size, help="frame size for eval latency and op level")
    parser.add_argument("--train-size", type=int, default=d.train_size,
                        help="frame size for the training step and memory")
    parser.add_argument("--online-size", type=int, default=d.online_size, help="frame size for the online step")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="paired rounds per wall-clock comparison")
    parser.add_argument("--repeats", type=int, default=d.repeats,
                        help=f"passes per round; each model's fastest pass counts (default {d.repeats})")
    parser.add_argument("--op-repeats", type=int, default=d.op_repeats,
                        help="repetitions per site for the op-level minimum")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=d.device,
                        help="cpu, or cuda: CUDA-event timing, torch.cuda peak memory and a throughput "
                             "table; its results go to their own section of --output (default cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype,
                        help="fp32, or bf16/fp16 autocast around every model (default fp32)")
    parser.add_argument("--amp", action="store_true",
                        help="autocast at the device's usual precision: fp16 on cuda, bf16 on cpu "
                             "(same as --dtype fp16 / --dtype bf16)")
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also measure under torch.compile (default: on, off with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--convert-model", default=d.convert_model,
                        help=f"the model whose convert() time is reported (default {d.convert_model})")
    parser.add_argument("--convert-repeats", type=int, default=d.convert_repeats,
                        help="convert() runs timed (median reported)")
    parser.add_argument("--max-clips", type=int, default=d.max_clips,
                        help=f"largest batch, in clips, the CUDA throughput search tries (default {d.max_clips})")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler table")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc settings, under which freed large buffers go back "
                             "to the OS and every new one page-faults (default: keep freed memory, see BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="a small configuration for tests/CI (seconds)")
    parser.add_argument("--output", default="docs/BENCHMARKS.md",
                        help="Markdown report path; a run replaces its device's section (default docs/BENCHMARKS.md)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--deploy", action="store_true",
                        help="instead: the online step and clip network in onnxruntime, OpenVINO (f32, bf16) and "
                             "ExecuTorch against each runtime's 2D network; writes the deploy section of --output")
    parser.add_argument("--deploy-models", help="--deploy: comma-separated model specs "
                        "(default timm:mobilenetv2_100,timm:resnet50)")
    parser.add_argument("--deploy-runtimes", help="--deploy: comma-separated runtimes among onnx, openvino, "
                        "openvino-bf16, executorch (default all)")
    parser.add_argument("--deploy-checkpoint", help="--deploy: a state_dict loaded into every model (default: random)")
    parser.add_argument("--deploy-accuracy", metavar="RUN_DIR",
                        help="instead: test top-1 of a `tsm-surgery demo` run's trained tsm and tsm-uni in PyTorch "
                             "and each runtime, float32 and int8; writes the deploy-accuracy section of --output")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` ``args`` ask for, after ``--quick`` and ``--amp``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    if args.quick:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        defaults = vars(parser.parse_args([]))
        values.update({k: v for k, v in QUICK.items() if values[k] == defaults[k]})
    if values.get("compile") is None:
        values["compile"] = not args.quick
    if getattr(args, "amp", False) and values["dtype"] == "fp32":
        values["dtype"] = "fp16" if values["device"] == "cuda" else "bf16"
    return Settings(**values)


def _check_device(settings: Settings) -> None:
    if settings.device != "cuda":
        return
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, {built}). "
            "Hint: run it on a machine with an NVIDIA GPU and a CUDA build of torch, or leave out --device "
            "for the CPU bench.")
    if settings.dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--device cuda --dtype bf16: this GPU has no bfloat16 support. Hint: --amp or --dtype fp16.")


def _run_deploy(args: argparse.Namespace) -> int:
    from tsm_surgery.integrations.studies import deploy

    values: dict = dict(deploy.QUICK) if args.quick else {}
    if args.deploy_models:
        values["models"] = tuple(args.deploy_models.split(","))
    if args.deploy_runtimes:
        values["runtimes"] = tuple(args.deploy_runtimes.split(","))
    values.update(threads=args.threads, checkpoint=args.deploy_checkpoint, seed=args.seed)
    result = deploy.run_deploy(deploy.DeploySettings(**values))
    section = deploy.write(args.output, result)
    print(section)
    print(f"wrote the deploy section of {args.output} in {result.elapsed_s:.0f} s")
    return 0


def _run_deploy_accuracy(args: argparse.Namespace) -> int:
    from tsm_surgery.integrations.studies import deploy_accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    targets = tuple(args.deploy_runtimes.split(",")) if args.deploy_runtimes else deploy_accuracy.TARGETS
    unknown = [t for t in targets if t not in deploy_accuracy.TARGETS]
    if unknown:
        raise ValueError(f"--deploy-runtimes {unknown[0]}: with --deploy-accuracy choose among "
                         f"{', '.join(deploy_accuracy.TARGETS)}.")
    result = deploy_accuracy.measure_accuracy(args.deploy_accuracy, targets)
    print(deploy_accuracy.write(args.output, result))
    print(f"wrote the deploy-accuracy section of {args.output} in {result.elapsed_s:.0f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.deploy_accuracy:
        return _run_deploy_accuracy(args)
    if args.deploy:
        return _run_deploy(args)
    settings = settings_from_args(args)
    _check_device(settings)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(settings)
    section = write(args.output, result)
    print(section)
    print(f"wrote the {settings.device} section of {args.output} in {result.elapsed_s:.0f} s")
    return 0

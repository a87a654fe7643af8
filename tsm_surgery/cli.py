"""The ``tsm-surgery`` command line.

Each verb lives in the module that owns the concept and provides two functions,
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their verb
runs, so ``tsm-surgery convert`` never imports MMAction2.
"""

import argparse
import importlib
import sys
from typing import List, Optional

# verb -> (module defining add_arguments/run, one-line help)
VERBS = {
    "demo": ("tsm_surgery.integrations.mmaction.demo",
             "train TSN vs TSM on the embedded synthetic videos, then stream"),
    "synth-data": ("tsm_surgery.integrations.mmaction.synth_data", "generate the temporal-reasoning video dataset"),
    "train": ("tsm_surgery.integrations.mmaction.runner", "train an MMAction2 config with mmengine's Runner"),
    "test": ("tsm_surgery.integrations.mmaction.runner_test", "evaluate an MMAction2 config and checkpoint"),
    "convert": ("tsm_surgery.integrations.convert_cli", "convert a model and print its shift-site table"),
    "import-checkpoint": ("tsm_surgery.integrations.import_checkpoint_cli",
                          "convert an MMAction2 or paper-repo TSM checkpoint to this project's keys"),
    "stream": ("tsm_surgery.integrations.stream", "run a video frame by frame through an online TSM model"),
    "export": ("tsm_surgery.integrations.export", "export an online or offline TSM model to ONNX"),
    "bench": ("tsm_surgery.integrations.bench", "benchmark the shift against the 2D model and the peers"),
    "coverage": ("tsm_surgery.integrations.timm_coverage", "convert timm/torchvision models and report coverage"),
    "ablate": ("tsm_surgery.integrations.ablate", "shift proportion x placement: latency and accuracy, with a plot"),
    "efficiency": ("tsm_surgery.integrations.efficiency", "FLOPs, params, latency of TSM against TSN and 3D networks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsm-surgery",
        description="Temporal Shift Module as model surgery. Run `tsm-surgery VERB --help` for a verb's options.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        verbs.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in VERBS:
        parser.parse_args(argv or ["--help"])
        return 2
    verb, rest = argv[0], argv[1:]
    module_name, help_text = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        print(f"tsm-surgery {verb}: cannot import {err.name!r} ({err}). Install the extras: "
              "pip install 'tsm_surgery[timm,mmaction,export]'", file=sys.stderr)
        return 1
    verb_parser = argparse.ArgumentParser(prog=f"tsm-surgery {verb}", description=help_text)
    module.add_arguments(verb_parser)
    return int(module.run(verb_parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())

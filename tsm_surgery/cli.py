"""The ``tsm-surgery`` command line.

Each verb lives in the module that owns the concept and provides two functions,
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their verb
runs, so ``tsm-surgery convert`` never imports MMAction2.

Errors are reported here, once for every verb: one line on stderr, ``tsm-surgery VERB: ...``,
naming the file or flag, and exit status 1. ``tsm-surgery --debug VERB ...`` (or ``--debug``
anywhere after the verb) shows the traceback instead.
"""

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "positive_int", "non_negative_int", "VERBS"]

# verb -> (module defining add_arguments/run, one-line help)
VERBS = {
    "demo": ("tsm_surgery.integrations.cli.demo",
             "train TSN vs TSM on the embedded synthetic videos, then stream"),
    "synth-data": ("tsm_surgery.integrations.cli.synth_data", "generate the temporal-reasoning video dataset"),
    "train": ("tsm_surgery.integrations.cli.train", "train an MMAction2 config with mmengine's Runner"),
    "test": ("tsm_surgery.integrations.cli.test", "evaluate an MMAction2 config and checkpoint"),
    "convert": ("tsm_surgery.integrations.cli.convert", "convert a model and print its shift-site table"),
    "import-checkpoint": ("tsm_surgery.integrations.cli.import_checkpoint",
                          "convert an MMAction2 or paper-repo TSM checkpoint to this project's keys"),
    "stream": ("tsm_surgery.integrations.cli.stream",
               "run videos, cameras and network streams frame by frame through an online TSM model"),
    "export": ("tsm_surgery.integrations.cli.export",
               "export an online or offline TSM model for onnxruntime, OpenVINO or ExecuTorch"),
    "bench": ("tsm_surgery.integrations.cli.bench", "benchmark the shift against the 2D model and the peers"),
    "coverage": ("tsm_surgery.integrations.cli.coverage", "convert timm/torchvision models and report coverage"),
    "ablate": ("tsm_surgery.integrations.cli.ablate",
               "shift proportion x placement: latency and accuracy, with a plot"),
    "efficiency": ("tsm_surgery.integrations.cli.efficiency",
                   "FLOPs, params, latency of TSM against TSN and 3D networks"),
}

# Exceptions whose message is meant for the user as it is; others also get their type named.
_USER_ERRORS = (OSError, ValueError, LookupError, ImportError)


class _UsageError(Exception):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit 2
        raise _UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; use 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsm-surgery",
        description="Temporal Shift Module as model surgery. Run `tsm-surgery VERB --help` for a verb's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        verbs.add_parser(verb, help=help_text, add_help=False)
    return parser


def _one_line(err: BaseException) -> str:
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    message = " ".join(message.split()) or repr(err)
    if isinstance(err, (_UsageError,) + _USER_ERRORS):
        return message
    return f"{type(err).__name__}: {message} (run with --debug for the traceback)"


def _run_verb(verb: str, rest: list[str]) -> int:
    module_name, help_text = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ImportError(f"cannot import {err.name!r} ({err}). Install the extras: "
                          "pip install 'tsm_surgery[timm,mmaction,export]'") from err
    verb_parser = _Parser(prog=f"tsm-surgery {verb}", description=help_text)
    module.add_arguments(verb_parser)
    verb_parser.add_argument("--debug", action="store_true", help="show the full traceback when the command fails")
    return int(module.run(verb_parser.parse_args(rest)) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] not in VERBS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    verb, rest = argv[0], argv[1:]
    debug = debug or "--debug" in rest
    try:
        return _run_verb(verb, rest)
    except KeyboardInterrupt:
        print(f"tsm-surgery {verb}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            raise  # --help, or a verb's own exit status
        if debug:
            raise
        print(f"tsm-surgery {verb}: {' '.join(str(err.code).split())}", file=sys.stderr)
        return 1
    except Exception as err:
        if debug:
            raise
        print(f"tsm-surgery {verb}: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

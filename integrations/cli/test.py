"""``tsm-surgery test CONFIG CHECKPOINT``: evaluate a checkpoint with mmengine's Runner.

The metrics are the only thing on stdout (JSON), so ``tsm-surgery test ... > metrics.json``
works; mmengine's log lines go to stderr (and to the work dir's log file). ``--out FILE``
also writes them to a file.

The Python form is :func:`tsm_surgery.integrations.training.runner.test`.
"""

import argparse
import contextlib
import json
import sys

from mmengine.config import DictAction

from tsm_surgery.integrations.outputs import atomic_outputs, claim_outputs
from tsm_surgery.integrations.training.runner import LAUNCHERS, test

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tsm-surgery test``."""
    parser.add_argument("config", help="MMAction2 config file")
    parser.add_argument("checkpoint", help="checkpoint to evaluate (loaded with weights_only=True)")
    parser.add_argument("--work-dir", help="where the test log goes (default work_dirs/<config name>)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none", help="'pytorch' under torchrun")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config keys, e.g. test_dataloader.batch_size=4")
    parser.add_argument("--out", help="also write the metrics JSON to this file (refused if it exists, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery test``: metrics JSON on stdout (and in ``--out``), logs on stderr."""
    if args.out:  # checked now; an existing file is replaced only once the new one is complete
        claim_outputs([(args.out, "the metrics JSON")], args.force)
    # mmengine's console handler writes to the sys.stdout it finds when the Runner builds its logger.
    with contextlib.redirect_stdout(sys.stderr):
        metrics = test(args.config, args.checkpoint, work_dir=args.work_dir,
                       cfg_options=dict(args.cfg_options) if args.cfg_options else None, launcher=args.launcher)
    text = json.dumps({k: float(v) for k, v in metrics.items()}, indent=2)
    if args.out:
        with atomic_outputs([(args.out, "the metrics JSON")], args.force) as (tmp,), open(tmp, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0

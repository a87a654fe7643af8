"""``tsm-surgery test CONFIG CHECKPOINT``: evaluate a checkpoint with mmengine's Runner.

The Python form is :func:`tsm_surgery.integrations.mmaction.runner.test`.
"""

import argparse
import json

from mmengine.config import DictAction

from .runner import LAUNCHERS, test

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tsm-surgery test``."""
    parser.add_argument("config", help="MMAction2 config file")
    parser.add_argument("checkpoint", help="checkpoint to evaluate (loaded with weights_only=True)")
    parser.add_argument("--work-dir", help="where the test log goes (default work_dirs/<config name>)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none", help="'pytorch' under torchrun")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config keys, e.g. test_dataloader.batch_size=4")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery test`` and prints the metrics as JSON."""
    metrics = test(args.config, args.checkpoint, work_dir=args.work_dir,
                   cfg_options=dict(args.cfg_options) if args.cfg_options else None, launcher=args.launcher)
    print(json.dumps({k: float(v) for k, v in metrics.items()}, indent=2))
    return 0

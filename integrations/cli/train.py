"""``tsm-surgery train CONFIG``: train an MMAction2 config with mmengine's Runner.

The library call is :func:`tsm_surgery.integrations.training.runner.train`.
"""

import argparse
from typing import Any

from mmengine.config import DictAction

from tsm_surgery.integrations.training.runner import LAUNCHERS, train

__all__ = ["add_arguments", "run"]


def _parse_cfg_options(values: dict[str, Any] | None) -> dict[str, Any] | None:
    return dict(values) if values else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tsm-surgery train``."""
    parser.add_argument("config", help="MMAction2 config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default work_dirs/<config name>)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help="'pytorch' under torchrun for DDP (gloo on CPU, nccl on CUDA)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config keys, e.g. train_cfg.max_epochs=1")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="resume full training state from the work dir's last checkpoint (or CHECKPOINT). "
                             "Unpickles the checkpoint in full if it holds more than weights: trusted files only")
    parser.add_argument("--load-from", help="initial weights, loaded with weights_only=True (with a bare --resume: "
                        "used when the work dir has nothing to resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train in a work dir that already holds checkpoints, replacing them")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery train``."""
    train(args.config, work_dir=args.work_dir, cfg_options=_parse_cfg_options(args.cfg_options),
          launcher=args.launcher, resume=args.resume, load_from=args.load_from, overwrite=args.overwrite)
    return 0

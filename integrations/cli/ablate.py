"""``tsm-surgery ablate``: shift proportion x placement, latency and accuracy, with a plot.

The library call is :func:`tsm_surgery.integrations.studies.ablate.run_ablation`.
"""

import argparse
import os
import sys

import torch

from tsm_surgery.integrations.studies.ablate import DEFAULTS, QUICK, run_ablation

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``ablate`` options to ``parser``."""
    parser.add_argument("--model", default="demo",
                        help="demo (default), timm:NAME, torchvision:NAME or mmaction:resnetNN")
    parser.add_argument("--out-dir", default="work_dirs/ablate", help="output folder; rerun with it to resume")
    parser.add_argument("--quick", action="store_true", help="a tiny grid for tests (1 epoch, 32 px)")
    parser.add_argument("--shift-divs", default=None, help="comma-separated shift_div values (default 16,8,4,2)")
    parser.add_argument("--places", default=None, help="comma-separated among residual,block (default both)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per accuracy point (default {DEFAULTS['seeds']})")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per training (default {DEFAULTS['epochs']})")
    parser.add_argument("--videos-per-class", type=int, default=None,
                        help=f"harder data: videos per class (default {DEFAULTS['videos_per_class']})")
    parser.add_argument("--rounds", type=int, default=None, help="paired latency rounds (default 15)")
    parser.add_argument("--latency-size", type=int, default=None,
                        help="frame size for latency (default: 64 for the demo network, else 224)")
    parser.add_argument("--size", type=int, default=None, help="frame size of the harder data (default 32)")
    parser.add_argument("--only", choices=("latency", "accuracy"), default=None, help="run one half of the ablation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: cores - 1, at least 1)")
    parser.add_argument("--force", action="store_true", help="discard a previous run in --out-dir")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery ablate``."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads if args.threads > 0 else max(1, (os.cpu_count() or 2) - 1))
    settings = dict(QUICK if args.quick else DEFAULTS)
    for key in ("seeds", "epochs", "videos_per_class", "rounds", "latency_size", "size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["model"] = args.model
    try:
        if args.shift_divs:
            settings["shift_divs"] = [int(d) for d in args.shift_divs.split(",") if d]
        if args.places:
            settings["places"] = [p for p in args.places.split(",") if p]
        run_ablation(args.out_dir, settings, args.only, args.force, log=lambda line: print(line, flush=True))
    except (FileExistsError, ValueError) as err:
        print(f"tsm-surgery ablate: {err}", file=sys.stderr)
        return 1
    return 0

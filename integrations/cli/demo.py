"""``tsm-surgery demo``: train TSN against TSM on the embedded synthetic videos, test, then stream.

The library call is :func:`tsm_surgery.integrations.demo.pipeline.run_demo`.
"""

import argparse
import os

import torch

from tsm_surgery.integrations.demo.pipeline import DEFAULT_EPOCHS, MODELS_TRAINED, run_demo

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``demo`` options to ``parser``."""
    parser.add_argument("--out-dir", default=None,
                        help="run directory (default: a fresh work_dirs/demo/<timestamp>); refused if not empty "
                             "unless --force")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"epochs per model (default {DEFAULT_EPOCHS})")
    parser.add_argument("--videos-per-class", type=int, default=80, help="videos per class (default 80)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    parser.add_argument("--size", type=int, default=64, help="frame size in px (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the training (default 0)")
    parser.add_argument("--models", default=",".join(MODELS_TRAINED),
                        help="comma-separated subset of tsn,tsm,tsm-uni (default all three)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the configs' batch size (16)")
    parser.add_argument("--config-dir", default=None,
                        help="folder of the demo configs (default: the installed package data, configs/demo)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: one per core minus one, which decodes videos)")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming step")
    parser.add_argument("--force", action="store_true", help="replace what a previous demo wrote into --out-dir")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery demo``."""
    import warnings

    # mmcv-lite's missing CUDA ops and timm's init notice are expected here; keep the output readable.
    warnings.filterwarnings("ignore", category=UserWarning)
    # One core decodes videos (the dataloader worker), the others run the model: on 2 cores, one
    # torch thread. More threads than free cores makes CPU training several times slower.
    torch.set_num_threads(args.threads if args.threads > 0 else max(1, (os.cpu_count() or 2) - 1))
    run_demo(args.out_dir, args.epochs, args.videos_per_class, args.frames, args.size, args.seed,
             [m for m in args.models.split(",") if m], args.force, args.config_dir, args.batch_size,
             not args.no_stream)
    return 0

"""``tsm-surgery synth-data OUT_DIR``: write the temporal-reasoning video dataset.

The library call is :func:`tsm_surgery.integrations.demo.synth_data.generate`.
"""

import argparse
import time

from tsm_surgery.integrations.demo.synth_data import CLASSES, check_settings, generate

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``synth-data`` options to ``parser``."""
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (must be empty unless --force)")
    parser.add_argument("--videos-per-class", type=int, default=80, help="videos per class (default 80: 480 in all)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels (default 64)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a previous run's files in OUT_DIR")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery synth-data``."""
    start = time.time()

    def progress(done: int, total: int) -> None:
        if done == total or done % 60 == 0:
            print(f"  {done}/{total} videos", flush=True)

    check_settings(args.videos_per_class, args.size, args.frames, args.seed)
    print(f"writing {len(CLASSES) * args.videos_per_class} videos ({args.size}x{args.size}, "
          f"{args.frames} frames, seed {args.seed}) to {args.out_dir}", flush=True)
    meta = generate(args.out_dir, args.videos_per_class, args.size, args.frames, args.seed, args.force, progress)
    counts = ", ".join(f"{k} {v}" for k, v in meta["counts"].items())
    print(f"done in {time.time() - start:.1f} s: {counts}; classes: {', '.join(CLASSES)}")
    return 0

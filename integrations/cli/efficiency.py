"""``tsm-surgery efficiency``: FLOPs, parameters and latency of TSM against TSN and 3D networks.

The library calls are in :mod:`tsm_surgery.integrations.studies.efficiency`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tsm_surgery.integrations.studies.efficiency import (
    BASE,
    STOCK_CONFIGS,
    measure,
    online_claim,
    plot,
    report,
    write_section,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``efficiency`` options to ``parser``."""
    parser.add_argument("--models", default=",".join(STOCK_CONFIGS),
                        help=f"comma-separated subset of: {', '.join(STOCK_CONFIGS)} (TSN is always included)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (default 8)")
    parser.add_argument("--size", type=int, default=224, help="frame size in px (default 224)")
    parser.add_argument("--batch", type=int, default=1, help="clips per batch, equal for every model (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="paired latency rounds (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--no-online", action="store_true", help="skip the online-versus-offline measurement")
    parser.add_argument("--output", default="docs/BENCHMARKS.md",
                        help="Markdown file whose efficiency section is replaced")
    parser.add_argument("--plot", default="docs/efficiency.png", help="bar chart PNG (default docs/efficiency.png)")
    parser.add_argument("--json", default=None, help="also write every number as JSON here")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery efficiency``."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in STOCK_CONFIGS]
    if unknown:
        print(f"tsm-surgery efficiency: unknown model(s) {unknown}; choose from {', '.join(STOCK_CONFIGS)}.",
              file=sys.stderr)
        return 1
    start = time.time()
    print(f"building and timing {len(set(names) | {BASE})} models ({args.frames} frames x {args.size} px, "
          f"batch {args.batch}, {args.rounds} rounds on {args.device})", flush=True)
    result = measure(names, args.batch, args.frames, args.size, args.rounds, args.device)
    if not args.no_online:
        print("timing the online step against one offline clip pass per frame", flush=True)
        result["online"] = online_claim(args.frames, args.size, max(args.rounds * 2, 5), args.device)
    section = report(result)
    print(section)
    write_section(Path(args.output), section)
    plot(result, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote the section of {args.output} and {args.plot} in {time.time() - start:.0f} s", flush=True)
    return 0

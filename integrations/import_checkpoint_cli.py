"""``tsm-surgery import-checkpoint SRC OUT``: an MMAction2 or paper-repo TSM checkpoint in this project's keys.

OUT holds ``{'state_dict': ..., 'meta': {'source': ..., 'layout': ..., 'description': ...}}``,
plain tensors and strings, so ``torch.load(OUT, weights_only=True)``, MMAction2's ``load_from``
and ``tsm-surgery test CONFIG OUT`` read it.
"""

import argparse
import os
import sys

import torch

from tsm_surgery.integrations.checkpoints import CheckpointLayoutError, convert_state_dict, read_state_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the checkpoint: MMAction2 ResNetTSM/MobileNetV2TSM/MobileOneTSM/"
                        "TPN, the paper's TSN (ResNet, MobileNetV2) or its online demo MobileNetV2")
    parser.add_argument("out", metavar="OUT", help="where to write the converted checkpoint")
    parser.add_argument("--force", action="store_true", help="write over an existing OUT")


def run(args: argparse.Namespace) -> int:
    src, out = os.path.expanduser(args.src), os.path.expanduser(args.out)
    if os.path.exists(out) and not args.force:
        print(f"tsm-surgery import-checkpoint: {out} exists; nothing written. Pass --force to replace it.",
              file=sys.stderr)
        return 1
    if os.path.exists(out) and os.path.samefile(src, out):
        print(f"tsm-surgery import-checkpoint: OUT is SRC ({src}); write the result elsewhere.", file=sys.stderr)
        return 1
    try:
        state, source = read_state_dict(src)
        converted, layout = convert_state_dict(state, source=source)
    except (CheckpointLayoutError, FileNotFoundError) as err:
        print(f"tsm-surgery import-checkpoint: {err}", file=sys.stderr)
        return 1
    meta = {"source": os.path.abspath(src), "layout": layout.name, "description": layout.description}
    tmp = f"{out}.tmp{os.getpid()}"
    torch.save({"state_dict": converted, "meta": meta}, tmp)
    os.replace(tmp, out)  # a reader never sees a half-written OUT
    print(f"{src}: detected {layout}")
    if layout.hint:
        print(f"note: {layout.hint}")
    print(f"wrote {len(converted)} tensors to {out}")
    return 0

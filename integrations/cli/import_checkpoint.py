"""``tsm-surgery import-checkpoint SRC OUT``: an MMAction2 or paper-repo TSM checkpoint in this project's keys.

OUT holds ``{'state_dict': ..., 'meta': {'source': ..., 'layout': ..., 'description': ...}}``,
plain tensors and strings, so ``torch.load(OUT, weights_only=True)``, MMAction2's ``load_from``
and ``tsm-surgery test CONFIG OUT`` read it.
"""

import argparse
import os

import torch

from tsm_surgery.integrations.checkpoints import convert_state_dict, read_state_dict
from tsm_surgery.integrations.outputs import atomic_outputs, claim_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the checkpoint: MMAction2 ResNetTSM/MobileNetV2TSM/MobileOneTSM/"
                        "TPN, the paper's TSN (ResNet, MobileNetV2) or its online demo MobileNetV2")
    parser.add_argument("out", metavar="OUT", help="where to write the converted checkpoint")
    parser.add_argument("--force", action="store_true", help="write over an existing OUT")


def run(args: argparse.Namespace) -> int:
    src, out = os.path.expanduser(args.src), os.path.expanduser(args.out)
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise ValueError(f"OUT is SRC ({src}); write the result elsewhere.")
    claim_outputs([(out, "the imported checkpoint")], force=args.force)  # before the (slow) read
    state, source = read_state_dict(src)
    converted, layout = convert_state_dict(state, source=source)
    meta = {"source": os.path.abspath(src), "layout": layout.name, "description": layout.description}
    with atomic_outputs([(out, "the imported checkpoint")], force=args.force) as (tmp,):
        torch.save({"state_dict": converted, "meta": meta}, tmp)  # a reader never sees a half-written OUT
    print(f"{src}: detected {layout}")
    if layout.hint:
        print(f"note: {layout.hint}")
    print(f"wrote {len(converted)} tensors to {out}")
    return 0

"""``tsm-surgery convert``: convert a timm/torchvision model and print its shift-site table."""

import argparse
import sys
import time

import torch

import tsm_surgery
from tsm_surgery.cli import positive_int
from tsm_surgery.integrations.checkpoints import check_checkpoint_layout, read_state_dict, shift_for_checkpoint
from tsm_surgery.integrations.checkpoints.loading import cli_log
from tsm_surgery.integrations.models import build_model
from tsm_surgery.integrations.outputs import atomic_outputs, claim_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm:NAME, torchvision:NAME or a bare timm name (random weights)")
    parser.add_argument("--n-segments", type=positive_int, default=8, help="frames per clip (default 8)")
    parser.add_argument("--shift-div", type=positive_int, default=8, help="1/shift_div of the channels move each way")
    parser.add_argument("--direction", choices=("bi", "uni"), default="bi")
    parser.add_argument("--uni-slot", choices=("past", "first"),
                        help="with --direction uni: channels read from the previous frame, 'past' = [fold, 2*fold) "
                             "(default) or 'first' = [0, fold) (the paper's online demo; default for its checkpoint)")
    parser.add_argument("--place", choices=("residual", "block"), default="residual")
    parser.add_argument("--select", action="append", help="glob over site names; repeatable")
    parser.add_argument("--checkpoint", help="2D state_dict to load before converting (strict, weights_only=True)")
    parser.add_argument("--num-classes", type=positive_int, help="classifier size (default: the model's own)")
    parser.add_argument("--out", help="save the converted module here (torch.save; load with weights_only=False)")
    parser.add_argument("--graph", help="write the converted eval graph's Python code here")
    parser.add_argument("--force", action="store_true", help="replace existing --out/--graph files")


def run(args: argparse.Namespace) -> int:
    roles = [(args.out, "the converted module"), (args.graph, "its eval graph's code")]
    outputs = [(path, role) for path, role in roles if path]
    claim_outputs(outputs, args.force)  # before anything slow; the files are replaced only once complete
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = build_model(args.model, checkpoint=args.checkpoint, **kwargs)
    start = time.perf_counter()
    if args.uni_slot and args.direction != "uni":
        raise ValueError("--uni-slot applies to a uni shift: add --direction uni.")
    weights = read_state_dict(args.checkpoint)[0] if args.checkpoint else None  # read once for both checks
    direction, slot = shift_for_checkpoint(weights, args.direction, args.uni_slot, "--checkpoint", log=cli_log)
    net = tsm_surgery.convert(model, args.n_segments, shift_div=args.shift_div, direction=direction,
                              uni_slot=slot, place=args.place, select=args.select)
    check_checkpoint_layout(weights, net, "--checkpoint", log=cli_log)
    seconds = time.perf_counter() - start
    print(tsm_surgery.site_table(net.sites))
    print(f"\n{len(net.sites)} sites shifted ({args.direction}, 1/{args.shift_div} each way, place={args.place}) "
          f"in {seconds:.2f} s; state_dict keys unchanged.")
    if args.out and not args.checkpoint:
        print("tsm-surgery convert: note: no --checkpoint, so the saved module has random weights; pass "
              "--checkpoint FILE for trained ones", file=sys.stderr)
    if not outputs:
        return 0
    with atomic_outputs(outputs, args.force) as temps:
        paths = dict(zip([role for _, role in outputs], temps))
        if args.out:
            torch.save(net, paths["the converted module"])
        if args.graph:
            with open(paths["its eval graph's code"], "w") as f:
                f.write(net.eval_graph.python_code("self").src)
    if args.out:
        print(f"saved the converted module to {args.out} (torch.load(..., weights_only=False), trusted files only)")
    if args.graph:
        print(f"wrote the eval graph's code to {args.graph}")
    return 0

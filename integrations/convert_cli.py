"""``tsm-surgery convert``: convert a timm/torchvision model and print its shift-site table."""

import argparse
import time

import torch

import tsm_surgery
from tsm_surgery.integrations.models import build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm:NAME, torchvision:NAME or a bare timm name (random weights)")
    parser.add_argument("--n-segments", type=int, default=8, help="frames per clip (default 8)")
    parser.add_argument("--shift-div", type=int, default=8, help="1/shift_div of the channels move each way")
    parser.add_argument("--direction", choices=("bi", "uni"), default="bi")
    parser.add_argument("--place", choices=("residual", "block"), default="residual")
    parser.add_argument("--select", action="append", help="glob over site names; repeatable")
    parser.add_argument("--checkpoint", help="2D state_dict to load before converting (loaded with weights_only=True)")
    parser.add_argument("--out", help="save the converted module here (torch.save; load with weights_only=False)")
    parser.add_argument("--graph", help="write the converted eval graph's Python code here")


def run(args: argparse.Namespace) -> int:
    model = build_model(args.model)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    start = time.perf_counter()
    net = tsm_surgery.convert(model, args.n_segments, shift_div=args.shift_div, direction=args.direction,
                              place=args.place, select=args.select)
    seconds = time.perf_counter() - start
    print(tsm_surgery.site_table(net.sites))
    print(f"\n{len(net.sites)} sites shifted ({args.direction}, 1/{args.shift_div} each way, place={args.place}) "
          f"in {seconds:.2f} s; state_dict keys unchanged.")
    if args.out:
        torch.save(net, args.out)
        print(f"saved the converted module to {args.out} (torch.load(..., weights_only=False), trusted files only)")
    if args.graph:
        with open(args.graph, "w") as f:
            f.write(net.eval_graph.python_code("self").src)
        print(f"wrote the eval graph's code to {args.graph}")
    return 0

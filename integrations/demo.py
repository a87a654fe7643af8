"""``tsm-surgery demo``: the main job on embedded data (interim: conversion only)."""

import argparse

import torch

import tsm_surgery
from tsm_surgery.integrations.models import build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="timm:mobilenetv2_100")
    parser.add_argument("--n-segments", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10).eval()
    net = tsm_surgery.convert(model, args.n_segments).eval()
    print(tsm_surgery.site_table(net.sites))
    clip = torch.randn(2 * args.n_segments, 3, 112, 112)
    with torch.no_grad():
        plain, shifted = model(clip), net(clip)
    print(f"\n{len(net.sites)} shift sites; a clip of 2x{args.n_segments} frames -> {tuple(shifted.shape)}; "
          f"max |TSM - 2D| = {(plain - shifted).abs().max():.3g}")
    return 0

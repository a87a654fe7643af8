"""``tsm-surgery efficiency``: TSM at 2D cost, against MMAction2's stock 3D networks.

Builds, with random weights and from MMAction2's own stock configs, the recognizers below and
feeds each the same clip (``--frames`` frames of ``--size`` px, ``--batch`` clips):

========  ==================================================================================
TSN       ``tsn_imagenet-pretrained-r50_..._1x1x8``: 2D ResNet-50, average consensus
TSM       the TSN config with its backbone wrapped in ``TSMSurgeryBackbone`` (this project)
ResNetTSM ``tsm_imagenet-pretrained-r50_..._1x1x8``: MMAction2's own TSM
I3D       ``i3d_imagenet-pretrained-r50_..._32x2x1``: inflated 3D ResNet-50
SlowOnly  ``slowonly_r50_..._8x8x1``: 3D ResNet-50, 3D convs in the late stages
C2D       ``c2d_r50-in1k-pre_..._8x8x1``: 2D convs plus temporal pooling
TPN       ``tpn-slowonly_r50_..._8x8x1``: SlowOnly with a temporal pyramid neck
========  ==================================================================================

For each it reports FLOPs per clip (``torch.utils.flop_counter``, the same counter for all;
a shift is a copy and counts zero), parameters, eval latency as a ratio to TSN (paired
shuffled rounds with an A/A control, a copy of TSN) and throughput in clips per second. On CPU
the times are reported as ratios only; absolute times are given on a GPU. It also measures
the online claim: the per-frame cost of a streaming uni-directional TSM step against the naive
way to predict at every frame, one offline clip pass per new frame.

The report replaces its own section of ``--output`` (``BENCHMARKS.md``, next to the sections
``tsm-surgery bench`` writes per device) and writes
``--plot`` (``efficiency.png``).

Example:
    tsm-surgery efficiency                     # 76 s with one thread on a quiet CPU
    tsm-surgery efficiency --size 64 --rounds 3 --output /tmp/eff.md --plot /tmp/eff.png
"""

import copy
import datetime
import os
import platform
from pathlib import Path

import torch
from torch import nn

__all__ = ["STOCK_CONFIGS", "build_recognizer", "count_flops", "measure", "online_claim", "report"]

# name -> (stock config under mmaction's .mim/configs/recognition, what it is)
STOCK_CONFIGS = {
    "TSN": ("tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x8-100e_kinetics400-rgb.py", "2D ResNet-50, 8 segments"),
    "TSM (ours)": ("tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x8-100e_kinetics400-rgb.py",
                   "TSN's ResNet-50 in TSMSurgeryBackbone, shift_div 8, residual"),
    "ResNetTSM": ("tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.py", "MMAction2's ResNetTSM-50"),
    "I3D": ("i3d/i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb.py", "inflated 3D ResNet-50"),
    "SlowOnly": ("slowonly/slowonly_r50_8xb16-8x8x1-256e_kinetics400-rgb.py", "3D ResNet-50 (slow pathway)"),
    "C2D": ("c2d/c2d_r50-in1k-pre_8xb32-8x8x1-100e_kinetics400-rgb.py", "2D ResNet-50 with temporal pooling"),
    "TPN": ("tpn/tpn-slowonly_r50_8xb8-8x8x1-150e_kinetics400-rgb.py", "SlowOnly-R50 + temporal pyramid neck"),
}
BASE = "TSN"
SECTION = "efficiency"  # its key among the device sections of `tsm-surgery bench`'s report


def _no_downloads(node):
    """A model config with every pretrained-weights reference removed (random weights)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "pretrained":
                value = None
            elif key == "pretrained2d":
                value = False
            elif key == "init_cfg" and isinstance(value, dict) and value.get("type") == "Pretrained":
                continue
            out[key] = _no_downloads(value)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_no_downloads(v) for v in node)
    return node


def _stock_config(name: str):
    import mmaction
    from mmengine.config import Config

    if name not in STOCK_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(STOCK_CONFIGS)}.")
    path = Path(mmaction.__file__).parent / ".mim" / "configs" / "recognition" / STOCK_CONFIGS[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"stock config {path} is missing: reinstall mmaction2==1.2.0.")
    return Config.fromfile(str(path))


def stock_frames(name: str) -> int:
    """Frames per clip the stock config trains on (``clip_len x num_clips`` of its ``SampleFrames``)."""
    step = next(s for s in _stock_config(name).train_pipeline if s["type"] == "SampleFrames")
    return int(step["clip_len"]) * int(step.get("num_clips", 1))


def build_recognizer(name: str) -> nn.Module:
    """Builds a model of :data:`STOCK_CONFIGS` from its stock config, random weights, eval mode.

    Example:
        >>> model = build_recognizer("SlowOnly")  # doctest: +SKIP
    """
    from tsm_surgery.integrations.mmaction import compat

    compat.apply()
    from mmaction.registry import MODELS
    from mmengine.registry import init_default_scope

    import tsm_surgery.integrations.mmaction  # noqa: F401  (registers TSMSurgeryBackbone)

    model_cfg = _no_downloads(_stock_config(name).model.to_dict())
    if name == "TSM (ours)":
        model_cfg["backbone"] = dict(type="TSMSurgeryBackbone", backbone=model_cfg["backbone"], num_segments=8,
                                     shift_div=8, shift_place="blockres")
    init_default_scope("mmaction")
    # PyTorch's default initialisation: init_weights() would try to load the configs' 2D weights.
    return MODELS.build(model_cfg).eval()


def clip_input(model: nn.Module, batch: int, frames: int, size: int) -> torch.Tensor:
    """A random clip in the layout the recognizer takes: 2D ``(N, T, C, H, W)``, 3D ``(N, 1, C, T, H, W)``."""
    from mmaction.models.recognizers import Recognizer3D

    if isinstance(model, Recognizer3D):
        return torch.randn(batch, 1, 3, frames, size, size)
    return torch.randn(batch, frames, 3, size, size)


def _forward(model: nn.Module, x: torch.Tensor):
    if hasattr(model.backbone, "num_segments"):
        model.backbone.num_segments = x.shape[1]  # a 2D TSM model follows the clip length
    with torch.no_grad():
        return model(x, mode="tensor", stage="head")


def count_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Floating-point operations of one forward on ``x`` (``torch.utils.flop_counter``; a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _forward(model, x)
    return float(counter.get_total_flops())


def measure(names: list[str], batch: int, frames: int, size: int, rounds: int, device: str = "cpu") -> dict:
    """FLOPs, parameters, latency ratio to TSN and throughput of each model, side by side."""
    from .bench import CONTROL, paired_ratios

    if BASE not in names:
        names = [BASE] + list(names)
    rows: dict[str, dict] = {}
    fns = {}
    for name in names:
        model = build_recognizer(name).to(device)
        x = clip_input(model, batch, frames, size).to(device)
        stock_x = clip_input(model, 1, stock_frames(name), size).to(device)
        rows[name] = {"config": STOCK_CONFIGS[name][0], "what": STOCK_CONFIGS[name][1],
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                      "gflops": count_flops(model, x) / batch / 1e9, "stock_frames": stock_frames(name),
                      "stock_gflops": count_flops(model, stock_x) / 1e9,
                      "output": list(_forward(model, x).shape)}
        fns[name] = _timed(model, x, device)
        if name == BASE:
            fns[CONTROL] = _timed(copy.deepcopy(model), x, device)
    timing = paired_ratios(fns, BASE, rounds)
    for name, row in rows.items():
        t = timing[name]
        row.update(latency_ratio=t["ratio"], latency_p25=t["ratio_p25"], latency_p75=t["ratio_p75"],
                   latency_ms=1e3 * t["median_s"], clips_per_s=batch / t["median_s"])
    control = timing[CONTROL]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"rows": rows, "control": dict(ratio=control["ratio"], p25=control["ratio_p25"], p75=control["ratio_p75"]),
            "load_average": load, "date": datetime.date.today().isoformat(),
            "batch": batch, "frames": frames, "size": size, "rounds": rounds, "device": _device_name(device),
            "threads": torch.get_num_threads()}


def _timed(model: nn.Module, x: torch.Tensor, device: str):
    def call():
        _forward(model, x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return call


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()})"


def online_claim(frames: int, size: int, rounds: int, device: str = "cpu") -> dict:
    """Per-frame cost of a prediction at every frame: the online step against one offline clip pass.

    The network is TSN's 2D ResNet-50 converted uni-directionally (``direction='uni'``): online,
    each new frame costs one :func:`tsm_surgery.to_online` step; offline, the naive way runs the
    clip network on the last ``frames`` frames at every new frame. Both are compared with the 2D
    network on one frame.
    """
    import tsm_surgery

    from .bench import paired_ratios

    plain = build_recognizer(BASE).backbone.to(device)  # eval mode already; mmaction's train() returns None
    offline = tsm_surgery.convert(plain, frames, direction="uni").to(device).eval()
    online = tsm_surgery.to_online(tsm_surgery.convert(plain, frames, direction="uni")).to(device).eval()
    frame = torch.randn(1, 3, size, size, device=device)
    clip = torch.randn(frames, 3, size, size, device=device)

    def wrap(fn):
        def call():
            with torch.no_grad():
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return call

    res = paired_ratios({"2D frame": wrap(lambda: plain(frame)), "online step": wrap(lambda: online(frame)),
                         "offline clip pass": wrap(lambda: offline(clip))}, "2D frame", rounds)
    return {name: dict(ratio=r["ratio"], p25=r["ratio_p25"], p75=r["ratio_p75"], ms=1e3 * r["median_s"])
            for name, r in res.items()} | {"frames": frames, "size": size}


# --------------------------------------------------------------------------- report
def _ratio(entry: dict) -> str:
    return f"{entry['ratio']:.2f}x ({entry['p25']:.2f}-{entry['p75']:.2f})"


def _load(result: dict) -> str:
    load = result.get("load_average")
    return "" if load is None else f", load average {load:.1f} at the end of timing"


def report(result: dict) -> str:
    """The Markdown section: the efficiency table and the online claim."""
    gpu = not result["device"].startswith("CPU")
    rows = result["rows"]
    lines = ["## Efficiency: TSM at 2D cost, against 3D networks", "",
             f"`tsm-surgery efficiency` on {result['device']}, {result['threads']} thread(s), "
             f"{result.get('date', '')}{_load(result)}. Every model is built from MMAction2's stock config "
             f"with random weights and takes the same input: {result['batch']} clip(s) of {result['frames']} frames at "
             f"{result['size']} px. FLOPs from `torch.utils.flop_counter` (a multiply-add counts 2; a shift is a copy "
             "and counts 0). Latency: median ratio to TSN over "
             f"{result['rounds']} paired shuffled rounds, interquartile range in brackets.", "",
             "| model | what | GFLOPs / clip | params (M) | latency vs TSN | "
             + ("latency (ms) | clips/s | " if gpu else "") + "GFLOPs at its stock clip |",
             "|---|---|---|---|---|" + ("---|---|" if gpu else "") + "---|"]
    for name, row in rows.items():
        cells = [name, row["what"], f"{row['gflops']:.1f}", f"{row['params_m']:.1f}",
                 _ratio(dict(ratio=row["latency_ratio"], p25=row["latency_p25"], p75=row["latency_p75"]))]
        cells += [f"{row['latency_ms']:.1f}", f"{row['clips_per_s']:.1f}"] if gpu else []
        cells.append(f"{row['stock_gflops']:.1f} ({row['stock_frames']} frames)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"A/A control (a copy of TSN timed like the others): {_ratio(result['control'])}."
              + ("" if gpu else " On CPU only ratios are given: absolute times and throughput (clips/s) belong to "
                 "a GPU run; at equal batch a model's throughput relative to TSN is the inverse of its latency ratio."),
              "Some 3D networks reduce time early (I3D by 4 in its stem, being trained on 32-frame clips; C2D by 2 "
              "after its first stage), so on the same 8 frames they can cost less than TSN; the last column counts "
              "each at its stock clip length.",
              "ResNetTSM's stock config uses TSMHead, which applies its linear layer to every frame before "
              "averaging (TSNHead averages first): that head, not the shift, is its FLOP difference to TSN."]
    online = result.get("online")
    if online:
        lines += ["", "### Online: a prediction at every frame", "",
                  f"TSN's ResNet-50 converted uni-directionally, {online['frames']}-frame clips at "
                  f"{online['size']} px. "
                  "Naive: one offline clip pass over the last frames at every new frame. Online: one "
                  "`to_online` step per frame, the shifted channels cached.", "",
                  "| per new frame | cost vs the 2D network on one frame |" + (" ms |" if gpu else ""),
                  "|---|---|" + ("---|" if gpu else "")]
        for name in ("2D frame", "online step", "offline clip pass"):
            lines.append(f"| {name} | {_ratio(online[name])} |" + (f" {online[name]['ms']:.2f} |" if gpu else ""))
        saving = online["offline clip pass"]["ratio"] / online["online step"]["ratio"]
        lines += ["", f"The online step costs {saving:.1f}x less than the naive per-frame clip pass."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replaces this command's section of ``path`` (the bench's report); the bench's own sections are kept."""
    from .bench.report import write_section as write_report_section

    write_report_section(path, SECTION, section)


def plot(result: dict, path: Path) -> None:
    """Bar chart: GFLOPs, parameters and latency relative to TSN, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    rows = [result["rows"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    colors = ["C0" if not any(k in n for k in ("I3D", "SlowOnly", "C2D", "TPN")) else "C1" for n in names]
    panels = [("GFLOPs per clip", [r["gflops"] for r in rows]), ("parameters (M)", [r["params_m"] for r in rows]),
              ("eval latency vs TSN (x)", [r["latency_ratio"] for r in rows])]
    stock = [(i, r["stock_gflops"]) for i, r in enumerate(rows) if r["stock_frames"] != result["frames"]]
    if stock:  # a 3D network trained on longer clips, counted at its own clip length
        axes[0].scatter(*zip(*stock), marker="_", s=300, color="black", label="at its stock clip length")
        axes[0].legend(fontsize=7)
    axes[2].errorbar(range(len(names)), [r["latency_ratio"] for r in rows], fmt="none", ecolor="black", capsize=3,
                     yerr=[[r["latency_ratio"] - r["latency_p25"] for r in rows],
                           [r["latency_p75"] - r["latency_ratio"] for r in rows]])
    for ax, (title, values) in zip(axes, panels):
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}" if v >= 10 else f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    axes[2].axhline(1, color="black", lw=0.8)
    fig.suptitle(f"{result['frames']} frames x {result['size']} px, batch {result['batch']}, {result['device']} "
                 "(blue: 2D/TSM, orange: 3D)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

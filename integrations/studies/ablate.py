"""``tsm-surgery ablate``: the paper's shift-proportion and placement ablations on your backbone.

For one 2D backbone (the demo's quarter-width ResNet-18 by default, or a ``timm:``,
``torchvision:`` or ``mmaction:resnetNN`` spec) and a grid of shifted proportions (``shift_div``
16, 8, 4, 2: 1/8, 1/4, 1/2 and all of the channels in total) times the two placements
(``residual``: the shortcut sees the unshifted tensor; ``block``: in-place, every consumer sees
the shifted one), it measures in one process:

* **latency**: eval forward of one clip, as a ratio to the 2D network, timed side by side in
  shuffled rounds with an A/A control (a copy of the 2D network: its distance from 1.00x is the
  machine's noise);
* **accuracy**: each grid point plus proportion 0 (TSN) trained from scratch through MMAction2's
  Runner on a harder variant of the embedded time-reversal data (less motion, more noise, so
  that accuracy leaves the ceiling), with several seeds; scored on the held-out val and test
  videos together.

It writes ``ablation.json``, ``ablation.md`` (the table) and ``ablation.png`` into its output
folder. Every finished point is saved under ``points/`` as it ends, so an interrupted run picks
up where it stopped when given the same ``--out-dir``. A grid point that cannot convert (e.g.
``shift_div`` larger than a site's channels) is reported as such, not raised.

Example:
    tsm-surgery ablate                            # about 30 min on 2 CPU cores
    tsm-surgery ablate --quick --out-dir /tmp/ablate
    tsm-surgery ablate --model timm:resnet18 --only latency
"""

import copy
import gc
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .ablate_report import OUTPUTS, table, write_outputs

__all__ = ["DEFAULTS", "QUICK", "HARD_DATA", "AblationSettings", "run_ablation"]

PLACES = ("residual", "block")
# residual -> ResNetTSM's name in MMAction2 configs
_CONFIG_PLACE = {"residual": "blockres", "block": "block"}
# The harder data: 70% of the demo's motion under 1.5 times its sensor noise. On the default data
# every TSM variant ends near 100% and the curves cannot separate.
HARD_DATA = dict(motion_scale=0.7, noise_scale=1.5)
DEFAULTS = dict(model="demo", shift_divs=(16, 8, 4, 2), places=PLACES, seeds=2, epochs=15, videos_per_class=60,
                size=32, batch_size=8, frames=8, rounds=15, latency_size=None)
QUICK = dict(DEFAULTS, shift_divs=(8,), epochs=1, videos_per_class=3, rounds=3, latency_size=32)


class AblationSettings(dict):
    """The settings that define a run; a resumed run must match them (see :func:`run_ablation`)."""

    def key(self) -> str:
        return json.dumps(self, sort_keys=True)


# --------------------------------------------------------------------------- the backbone
def backbone_dict(spec: str) -> dict:
    """The MMAction2 backbone dict of ``demo`` or a model spec (:func:`~tsm_surgery.integrations.models.parse_spec`).

    Example:
        >>> backbone_dict("mmaction:resnet50")
        {'type': 'ResNet', 'depth': 50, 'pretrained': None}
    """
    if spec == "demo":
        from mmengine.config import Config

        from tsm_surgery.integrations.demo.pipeline import config_path

        return dict(Config.fromfile(str(config_path("tsn"))).model.backbone)
    from tsm_surgery.integrations.models import parse_spec

    try:
        parsed = parse_spec(spec)
    except ValueError as err:
        raise ValueError(f"--model: {err} The ablation also takes demo, its own network.") from None
    if parsed.source == "timm":
        return dict(type=f"timm.{parsed.name}", pretrained=False)
    if parsed.source == "torchvision":
        return dict(type=f"torchvision.{parsed.name}")
    return dict(type="ResNet", depth=parsed.resnet_depth, pretrained=None)


def build_2d(spec: str) -> nn.Module:
    """The 2D feature network of a spec in eval mode, built the way ``TSMSurgeryBackbone`` builds it."""
    from tsm_surgery.integrations.mmaction import backbone as surgery_backbone

    net, _ = surgery_backbone.build_2d_backbone(backbone_dict(spec))  # (network, its feature layout)
    net.eval()  # not chained: mmaction's ResNet.train() returns None
    return net


def _feature_channels(net: nn.Module, size: int) -> int:
    with torch.no_grad():
        out = net(torch.randn(1, 3, size, size))
    return int((next(iter(out.values())) if isinstance(out, dict) else out).shape[1])  # torchvision: {'features': x}


# --------------------------------------------------------------------------- latency
def measure_latency(spec: str, divs: Sequence[int], places: Sequence[str], frames: int, size: int,
                    rounds: int) -> dict:
    """Eval latency of every grid point against the 2D network, side by side, with the A/A control.

    Returns:
        ``{'2d_ms', 'control': {ratio, p25, p75}, 'points': {'<place>/<div>': {ratio, p25, p75} or {error}}}``.
    """
    import tsm_surgery

    from .bench import CONTROL, paired_ratios

    plain = build_2d(spec)
    models = {"2d": plain, CONTROL: copy.deepcopy(plain)}
    errors: dict[str, str] = {}
    for place in places:
        for div in divs:
            try:
                models[f"{place}/{div}"] = tsm_surgery.convert(plain, frames, shift_div=div, place=place).eval()
            except (ValueError, RuntimeError) as err:
                errors[f"{place}/{div}"] = f"cannot convert: {err}"
    x = torch.randn(frames, 3, size, size)

    def call(model):
        return lambda: model(x)

    with torch.no_grad():
        res = paired_ratios({name: call(m) for name, m in models.items()}, "2d", rounds, repeats=2)
    pick = lambda r: dict(ratio=r["ratio"], p25=r["ratio_p25"], p75=r["ratio_p75"])  # noqa: E731
    points = {name: pick(r) for name, r in res.items() if name not in ("2d", CONTROL)}
    points.update({name: {"error": msg} for name, msg in errors.items()})
    return {"2d_ms": 1e3 * res["2d"]["min_s"], "control": pick(res[CONTROL]), "points": points,
            "threads": torch.get_num_threads(), "frames": frames, "size": size, "rounds": rounds}


# --------------------------------------------------------------------------- accuracy
def make_data(root: Path, settings: AblationSettings) -> Path:
    """The harder embedded data (generated once per output folder), plus ``eval.txt`` = val + test."""
    from tsm_surgery.integrations.demo import synth_data

    if not (root / "eval.txt").is_file():
        synth_data.generate(root, videos_per_class=settings["videos_per_class"], size=settings["size"], frames=16,
                            seed=0, force=True, **HARD_DATA)
        (root / "eval.txt").write_text((root / "val.txt").read_text() + (root / "test.txt").read_text())
    return root


def _train_cfg(spec: str, div: int, place: str, data: Path, work_dir: Path, settings: AblationSettings, seed: int):
    from tsm_surgery.integrations.demo.pipeline import build_cfg

    cfg = build_cfg("tsn" if div == 0 else "tsm", data, work_dir, settings["epochs"], seed,
                    batch_size=settings["batch_size"])
    if spec != "demo":
        bdict = backbone_dict(spec)
        if div == 0:
            cfg.model.backbone = bdict
        else:
            cfg.model.backbone.backbone = bdict
        cfg.model.cls_head.in_channels = _feature_channels(build_2d(spec), settings["size"])
    if div:
        cfg.model.backbone.update(shift_div=div, shift_place=_CONFIG_PLACE[place])
    size = settings["size"]
    for split in ("train", "val", "test"):
        loader = cfg[f"{split}_dataloader"]
        loader.persistent_workers = False  # many runners in one process: no workers left behind
        for step in loader.dataset.pipeline:
            if step["type"] == "Resize":
                step["scale"] = (size, size)
            if step["type"] == "SampleFrames":
                step["num_clips"] = settings["frames"]
    cfg.test_dataloader.dataset.ann_file = str(data / "eval.txt")
    # No per-epoch validation: the last epoch's model is scored once on val + test.
    cfg.train_cfg.val_interval = settings["epochs"] + 1
    return cfg


def train_point(spec: str, div: int, place: str, seed: int, data: Path, work_dir: Path,
                settings: AblationSettings) -> dict:
    """Trains and scores one grid point; a point that cannot be built returns ``{'error': ...}``."""
    from tsm_surgery.integrations.demo.pipeline import train_and_test

    start = time.time()
    try:
        cfg = _train_cfg(spec, div, place, data, work_dir, settings, seed)
        result = train_and_test(f"{place}/{div}" if div else "tsn", cfg)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return {"error": f"cannot convert: {text}" if "shift_div" in text else f"failed: {text}",
                "seconds": time.time() - start}
    metrics = result["test"]
    del result
    gc.collect()
    for ckpt in work_dir.rglob("*.pth"):  # only the numbers are kept
        ckpt.unlink()
    within = [v for k, v in metrics.items() if k.endswith("_within")]
    return {"top1": metrics["pair/top1"], "within": sum(within) / max(len(within), 1),
            "seconds": time.time() - start}


# --------------------------------------------------------------------------- the run
def _grid(settings: AblationSettings) -> list[tuple[int, str, int]]:
    # Seed by seed: a run stopped half-way has already covered the whole grid once.
    return [point for s in range(settings["seeds"])
            for point in [(0, "tsn", s)] + [(div, place, s) for div in settings["shift_divs"]
                                            for place in settings["places"]]]


def _claim(out: Path, settings: AblationSettings, force: bool) -> None:
    saved = out / "points" / "settings.json"
    if force:
        for name in ("points", "runs", "data", *OUTPUTS):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    elif saved.is_file() and json.loads(saved.read_text()) != json.loads(settings.key()):
        raise FileExistsError(f"{out} holds an ablation with other settings ({saved.read_text().strip()}); "
                              "pass the same options to resume it, another --out-dir, or --force to start over.")
    elif not saved.is_file() and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no ablation; choose another --out-dir.")
    (out / "points").mkdir(parents=True, exist_ok=True)
    if not saved.is_file():
        saved.write_text(settings.key() + "\n")


def _save(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)  # a run killed mid-write leaves no half point


def run_ablation(out_dir: os.PathLike, settings: dict | None = None, only: str | None = None,
                 force: bool = False, log=print) -> dict:
    """Runs (or resumes) the ablation in ``out_dir``; returns what ``ablation.json`` holds.

    Args:
        out_dir: the output folder; a folder holding a run with the same settings is resumed.
        settings: keys of :data:`DEFAULTS`; missing keys take the defaults.
        only: ``'latency'`` or ``'accuracy'`` to run one half.
        force: discard what a previous run left in ``out_dir``.
        log: where progress lines go.

    Raises:
        FileExistsError: ``out_dir`` holds something else, or a run with other settings.
    """
    settings = AblationSettings({**DEFAULTS, **(settings or {})})
    settings.update(shift_divs=list(settings["shift_divs"]), places=list(settings["places"]))
    bad = [p for p in settings["places"] if p not in PLACES]
    if bad or any(d < 1 for d in settings["shift_divs"]) or settings["seeds"] < 1:
        raise ValueError(f"places must be among {PLACES}, shift_divs >= 1 and seeds >= 1; got {dict(settings)}.")
    backbone_dict(settings["model"])  # a bad spec fails before anything is written
    out = Path(out_dir)
    _claim(out, settings, force)
    points_dir = out / "points"
    todo = [] if only == "latency" else [p for p in _grid(settings)
                                         if not (points_dir / f"acc_{p[1]}_{p[0]}_seed{p[2]}.json").is_file()]
    lat_file = points_dir / "latency.json"
    do_latency = only != "accuracy" and not lat_file.is_file()
    total = len(todo) + int(do_latency)
    log(f"tsm-surgery ablate: {out}  model {settings['model']}; {total} point(s) to run "
        f"({len(_grid(settings)) - len(todo) if only != 'latency' else 0} accuracy point(s) already done)")
    wall = time.time()
    if do_latency:
        size = settings["latency_size"] or (64 if settings["model"] == "demo" else 224)
        log(f"[1/{total}] latency: {len(settings['shift_divs']) * len(settings['places'])} grid points against "
            f"the 2D network, {settings['rounds']} rounds, clip {settings['frames']}x{size}x{size}")
        _save(lat_file, measure_latency(settings["model"], settings["shift_divs"], settings["places"],
                                        settings["frames"], size, settings["rounds"]))
    if todo:
        data = make_data(out / "data", settings)
        spent: list[float] = []
        for i, (div, place, seed) in enumerate(todo):
            eta = f"; about {sum(spent) / len(spent) * (len(todo) - i) / 60:.0f} min left" if spent else ""
            name = "tsn" if div == 0 else f"{place} shift_div={div}"
            log(f"[{i + 1 + int(do_latency)}/{total}] train {name} seed {seed}{eta}")
            result = train_point(settings["model"], div, place, seed, data, out / "runs" / f"{place}_{div}_s{seed}",
                                 settings)
            spent.append(result["seconds"])
            outcome = result.get("error") or f"top-1 {100 * result['top1']:.1f}%"
            log(f"      {outcome} ({result['seconds']:.0f} s)")
            _save(points_dir / f"acc_{place}_{div}_seed{seed}.json", result)
    summary = write_outputs(out, settings, only)
    log(table(summary))
    log(f"wrote {', '.join(str(out / n) for n in OUTPUTS)} in {time.time() - wall:.0f} s")
    return summary

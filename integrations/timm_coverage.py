"""``tsm-surgery coverage``: convert timm and torchvision models and report what works.

For every model of the sweep (by default the smallest model of every timm family, i.e. every
timm model module, plus the smallest of every torchvision classification family) the command
checks, in order:

* ``traced``: the train and the eval graph trace (``torch.fx`` with the leaf registry);
* ``sites``: residual joins found (and, for networks without any, the no-residual policy);
* ``bi``: ``convert(direction="bi")`` runs and is *effective*: with random norm weights its
  output differs from the 2D model's on a clip of different frames;
* ``uni``: ``convert(direction="uni")`` runs and is causal;
* ``online``: the streaming form run frame by frame equals the offline uni network over the
  clip (DESIGN.md's definition), over ``--frames`` frames;
* ``backward``: a train-mode forward and backward of the bi network gives finite gradients.

A model *passes* when bi, uni and online all hold. Each model runs in a worker process with a
time limit, so a crash or a hang costs one row, not the sweep. Results go to a JSON file and
to COVERAGE.md.

Example:
    tsm-surgery coverage                         # the default sweep, writes COVERAGE.md
    tsm-surgery coverage --models 'resnet*' --limit 3 --out /tmp/cov.md
"""

import argparse
import copy
import fnmatch
import json
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["add_arguments", "run", "check_model", "sweep_specs", "ModelSpec", "FAMILY_KINDS"]

# timm model module -> "cnn" or "transformer" (transformers and conv/attention hybrids). A
# family counts as convolutional when its smallest model mixes tokens with convolutions only
# (pooling, shifts and gating count as convolutional); anything with attention, token mixing
# MLPs or recurrent token mixing is "transformer".
FAMILY_KINDS: Dict[str, str] = {
    **dict.fromkeys([
        "byobnet", "convmixer", "convnext", "cpubone", "cspnet", "cspnext", "densenet", "dla", "dpn",
        "efficientnet", "fasternet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next",
        "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2", "mambaout", "mobilenetv3",
        "nasnet", "nfnet", "pnasnet", "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest",
        "resnet", "resnetv2", "rexnet", "selecsls", "senet", "sknet", "starnet", "tresnet", "vgg",
        "vovnet", "xception", "xception_aligned",
        # torchvision
        "tv.alexnet", "tv.convnext", "tv.densenet", "tv.efficientnet", "tv.googlenet", "tv.inception",
        "tv.mnasnet", "tv.mobilenetv2", "tv.mobilenetv3", "tv.regnet", "tv.resnet", "tv.shufflenetv2",
        "tv.squeezenet", "tv.vgg",
    ], "cnn"),
    **dict.fromkeys([
        "beit", "byoanet", "cait", "coat", "convit", "crossvit", "csatv2", "davit", "deepseek_vit", "deit",
        "edgenext", "efficientformer", "efficientformer_v2", "efficientvim", "efficientvit_mit",
        "efficientvit_msra", "eva", "fastvit", "focalnet", "gcvit", "gemma4_vit", "hiera", "hieradet_sam2",
        "iformer", "levit", "lowformer", "maxxvit", "metaformer", "mlp_mixer", "mobilenetv5", "mobilevit",
        "mvitv2", "naflexvit", "nest", "nextvit", "pit", "pvt_v2", "qwen3_vit", "sequencer", "shvit",
        "swiftformer", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "tiny_vit",
        "tnt", "twins", "visformer", "vision_transformer", "vision_transformer_hybrid",
        "vision_transformer_relpos", "vision_transformer_sam", "vitamin", "volo", "xcit",
        # torchvision
        "tv.maxvit", "tv.swin_transformer", "tv.vision_transformer",
    ], "transformer"),
}

# Size words in model names, smallest first; used to pick candidates for "smallest of a family".
_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxxs", "xxs", "tiny", "xs", "t", "mini", "small", "s",
               "medium", "m", "base", "b", "large", "l", "xl", "huge", "h", "giant", "g"]
_IMAGE_SIZES = (64, 96, 128, 160, 224, 299)


@dataclass
class ModelSpec:
    """One model of the sweep.

    Attributes:
        source: ``"timm"`` or ``"torchvision"``.
        family: timm's model module (``"resnet"``) or ``"tv.<module>"`` for torchvision.
        candidates: model names; the worker runs the one with the fewest parameters.
    """

    source: str
    family: str
    candidates: Tuple[str, ...]

    @property
    def label(self) -> str:
        return self.candidates[0] if len(self.candidates) == 1 else f"{self.family} (smallest)"


@dataclass
class Result:
    """The outcome of one model (one row of COVERAGE.md)."""

    model: str
    source: str
    family: str
    kind: str
    params_m: float = 0.0
    input_size: int = 0
    traced: bool = False
    sites: int = 0
    other_joins: str = ""
    layout: str = ""
    policy: str = "residual"
    bi: bool = False
    effective: bool = False
    uni: bool = False
    online: bool = False
    backward: bool = False
    passed: bool = False
    stage: str = ""
    reason: str = ""
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Which models


def _size_rank(name: str) -> Tuple[int, int, str]:
    tokens = re.split(r"[_\-.]", name.lower())
    ranks = [_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS]
    digits = [int(d) for d in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else len(_SIZE_WORDS) // 2, min(digits) if digits else 0, name)


def _timm_family_specs(include_tests: bool = False) -> List[ModelSpec]:
    import timm

    specs = []
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if include_tests or not n.startswith("test_")]
        if not names:
            continue
        names.sort(key=lambda n: (_size_rank(n), len(n)))
        specs.append(ModelSpec("timm", module, tuple(names[:6])))
    return specs


def _tv_family(name: str) -> str:
    import torchvision

    module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    return "tv." + module.replace("_", "") if module in ("mobilenetv2", "mobilenetv3", "shufflenetv2") else "tv." + module


def _tv_names() -> List[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _tv_family_specs() -> List[ModelSpec]:
    families: Dict[str, List[str]] = {}
    for name in _tv_names():
        families.setdefault(_tv_family(name), []).append(name)
    return [ModelSpec("torchvision", fam, tuple(sorted(names, key=lambda n: (_size_rank(n), len(n)))[:6]))
            for fam, names in sorted(families.items())]


def sweep_specs(models: Optional[str] = None, limit: Optional[int] = None) -> List[ModelSpec]:
    """The sweep: the smallest model per family, or every model matching a glob.

    Args:
        models: comma-separated globs over model names (``"resnet*,tv:vit_*"``; ``tv:`` selects
            torchvision names); ``None`` runs one model per family.
        limit: keep the first ``limit`` models.
    """
    if models is None:
        specs = _timm_family_specs() + _tv_family_specs()
    else:
        import timm

        specs = []
        for pattern in models.split(","):
            pattern = pattern.strip()
            if pattern.startswith("tv:") or pattern.startswith("torchvision:"):
                glob = pattern.split(":", 1)[1]
                specs += [ModelSpec("torchvision", _tv_family(n), (n,)) for n in _tv_names() if fnmatch.fnmatchcase(n, glob)]
            else:
                for name in timm.list_models(pattern):
                    specs.append(ModelSpec("timm", _timm_module(name), (name,)))
    return specs[:limit] if limit else specs


def _timm_module(name: str) -> str:
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------------------------
# Building and checking one model


def _count_params_meta(source: str, name: str) -> float:
    import torch

    with torch.device("meta"):
        model = _create(source, name)
    return sum(p.numel() for p in model.parameters())


def _create(source: str, name: str, **kwargs):
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs)


def _smallest(spec: ModelSpec) -> str:
    if len(spec.candidates) == 1:
        return spec.candidates[0]
    sizes = []
    for name in spec.candidates:
        try:
            sizes.append((_count_params_meta(spec.source, name), name))
        except Exception:
            continue
    return min(sizes)[1] if sizes else spec.candidates[0]


def _build(source: str, name: str):
    """The model and the smallest square input it runs on (fewer than 5 tries)."""
    import torch

    last_err: Optional[BaseException] = None
    for size in _IMAGE_SIZES + (None,):
        try:
            model = None
            if source == "timm" and size is not None:
                try:
                    model = _create(source, name, img_size=size)
                except TypeError:  # a convolutional model: any size goes, no img_size argument
                    pass
            model = model if model is not None else _create(source, name)
            cfg = getattr(model, "pretrained_cfg", None) or {}
            run_size = size or (cfg.get("input_size") or (3, 224, 224))[-1]
            with torch.no_grad():  # both modes: the train graph may hold an auxiliary head
                model.train()
                model(torch.randn(2, 3, run_size, run_size))
                model.eval()
                model(torch.randn(1, 3, run_size, run_size))
            _reset_norm_stats(model)
            return model, run_size
        except Exception as err:  # too small for this model: try the next size
            last_err = err
    raise RuntimeError(f"cannot build or run {name}: {type(last_err).__name__}: {last_err}")


def _reset_norm_stats(model) -> None:
    for module in model.modules():
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()


def randomize_norms(model) -> None:
    """Random affine weights and statistics for every norm layer and layer scale.

    timm zero-initialises the last norm (or the layer scale) of many residual branches, so a
    fresh model's branches output (nearly) zeros and a shift inside them would change nothing.
    """
    import torch
    from torch import nn

    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norm_types) or type(module).__name__.endswith(("Norm", "Norm2d", "NormAct2d")):
                weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
                if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                    weight.uniform_(0.5, 1.5)
                if isinstance(bias, torch.Tensor) and bias.is_floating_point():
                    bias.uniform_(-0.2, 0.2)
                if isinstance(getattr(module, "running_var", None), torch.Tensor):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
            for pname, param in module.named_parameters(recurse=False):
                if param.dim() >= 2 and not bool(param.any()):  # zero-initialised heads and gates
                    param.normal_(0.0, 0.05)
                if pname in ("gamma", "scale", "skipinit_gain", "layer_scale") or pname.startswith("gamma") \
                        or pname.startswith("ls") or pname.startswith("layer_scale"):
                    param.uniform_(0.5, 1.5)


def _tensors(out) -> List[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _main_output(out):
    tensors = _tensors(out)
    if not tensors:
        raise RuntimeError(f"the model returned no tensor ({type(out).__name__})")
    return tensors[0]


def _close(a, b, tol: float = 1e-4) -> bool:
    import torch

    scale = max(1.0, float(b.abs().max()))
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol * scale))


def _online_outputs(uni_net, frames) -> List[Any]:
    import tsm_surgery

    online = tsm_surgery.to_online(uni_net)
    online.reset()
    return [_main_output(online(frame)) for frame in frames]


def _short(err: BaseException, limit: int = 220) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def calibrate_batch_norms(model, batch) -> None:
    """Sets BatchNorm running statistics to those of ``batch``, then leaves the model in eval mode.

    With random statistics some deep random networks (CSPNeXt at 64 px, for one) lose their
    signal layer by layer until the output no longer depends on the input, and then no shift
    can change it; calibrated statistics keep every layer's activations at unit scale.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def check_model(spec: ModelSpec, frames: int = 4, seed: int = 0) -> Result:
    """Runs every check on one model; never raises, the failure goes into ``Result.reason``.

    Args:
        spec: the model (the smallest of ``spec.candidates`` is used).
        frames: clip length ``T`` for the checks (at least 3 for the online check).
        seed: random seed for weights and inputs.
    """
    import torch

    import tsm_surgery
    from tsm_surgery._sites import analyse_graph
    from tsm_surgery._tracer import trace_train_and_eval

    start = time.perf_counter()
    torch.manual_seed(seed)
    name = _smallest(spec)
    res = Result(model=name, source=spec.source, family=spec.family, kind=FAMILY_KINDS.get(spec.family, "unknown"))
    stage = "build"
    try:
        model, size = _build(spec.source, name)
        res.input_size = size
        res.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        randomize_norms(model)
        image = torch.randn(1, 3, size, size)
        clip = torch.randn(frames, 3, size, size)
        calibrate_batch_norms(model, torch.randn(max(frames, 2), 3, size, size))

        stage = "trace"
        traced = copy.deepcopy(model)
        train_graph, eval_graph = trace_train_and_eval(traced)
        res.traced = True

        stage = "sites"
        _, joins = analyse_graph(traced, eval_graph, image)
        residual = [s for s in joins if s.kind == "residual"]
        res.sites = len(residual)
        others: Dict[str, int] = {}
        for s in joins:
            if s.kind != "residual":
                others[s.kind] = others.get(s.kind, 0) + 1
        res.other_joins = ", ".join(f"{k} {v}" for k, v in sorted(others.items()))
        res.layout = "/".join(sorted({("NCHW" if s.channel_dim == 1 else ("tokens" if len(s.shape) == 3 else "NHWC"))
                                      for s in residual}))
        convert_kwargs: Dict[str, Any] = {}
        if not residual:  # the stated policy for networks without residual joins, reported as such
            res.policy = "first_conv"
            convert_kwargs["no_residual"] = "first_conv"
            res.sites = sum(s.kind == "first_conv" for s in joins)
            res.layout = "/".join(sorted({("NCHW" if s.channel_dim == 1 else ("tokens" if len(s.shape) == 3 else "NHWC"))
                                          for s in joins if s.kind == "first_conv"}))

        stage = "bi"
        with torch.no_grad():
            ref = _main_output(model(clip))
        bi = tsm_surgery.convert(model, frames, direction="bi", example_input=image, **convert_kwargs)
        bi.eval()
        with torch.no_grad():
            out = _main_output(bi(clip))
        res.bi = True
        if out.shape != ref.shape:
            raise RuntimeError(f"bi output shape {tuple(out.shape)} differs from the 2D model's {tuple(ref.shape)}")
        # float32 noise is ~1e-7 of the output's scale; a shift moves the output far more
        res.effective = float((out - ref).abs().max()) > 1e-6 * max(1e-3, float(ref.abs().max()))
        if not res.effective:
            raise RuntimeError("the bi network's output equals the 2D model's: the shifts change nothing")

        stage = "uni"
        uni = tsm_surgery.convert(model, frames, direction="uni", example_input=image, **convert_kwargs)
        uni.eval()
        with torch.no_grad():
            offline = _main_output(uni(clip))
            res.uni = True
            stage = "online"
            online = _online_outputs(uni, [clip[t:t + 1] for t in range(frames)])
        bad = [t for t in range(frames) if not _close(online[t], offline[t:t + 1])]
        if bad:
            diff = max(float((online[t] - offline[t:t + 1]).abs().max()) for t in bad)
            raise RuntimeError(f"online output differs from offline at frames {bad} (max abs diff {diff:.3g})")
        res.online = True
        res.passed = res.bi and res.effective and res.uni and res.online

        stage = "backward"
        bi.train()
        out = bi(clip)
        loss = sum(t.float().mean() for t in _tensors(out))
        loss.backward()
        grads = [p.grad for p in bi.parameters() if p.grad is not None]
        if not grads or not all(bool(torch.isfinite(g).all()) for g in grads):
            raise RuntimeError("no or non-finite gradients")
        res.backward = True
        stage = ""
    except Exception as err:
        res.stage, res.reason = stage, _short(err)
        if os.environ.get("TSM_COVERAGE_TRACEBACK"):
            traceback.print_exc()
    res.seconds = round(time.perf_counter() - start, 2)
    return res


# ----------------------------------------------------------------------------------------------
# Worker pool: one process per job, killed and replaced on a crash or a timeout


def _worker(conn, threads: int, frames: int) -> None:
    import torch

    torch.set_num_threads(threads)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(asdict(check_model(ModelSpec(*task), frames=frames)))


class _Pool:
    def __init__(self, jobs: int, threads: int, frames: int):
        self.ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.threads, self.frames = threads, frames
        self.slots: List[Dict[str, Any]] = [self._start() for _ in range(jobs)]

    def _start(self) -> Dict[str, Any]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.threads, self.frames), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "task": None, "since": 0.0}

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot["conn"].send(None)
            except Exception:
                pass
            slot["proc"].join(timeout=5)
            if slot["proc"].is_alive():
                slot["proc"].kill()


def _failed(spec: ModelSpec, stage: str, reason: str, seconds: float) -> Dict[str, Any]:
    res = Result(model=spec.candidates[0] if len(spec.candidates) == 1 else spec.label, source=spec.source,
                 family=spec.family, kind=FAMILY_KINDS.get(spec.family, "unknown"), stage=stage, reason=reason,
                 seconds=round(seconds, 1))
    return asdict(res)


def run_sweep(specs: Sequence[ModelSpec], jobs: int = 1, timeout: float = 180.0, frames: int = 4,
              progress=print) -> List[Dict[str, Any]]:
    """Checks every spec in worker processes and returns the result rows in ``specs`` order."""
    cpus = os.cpu_count() or 1
    pool = _Pool(max(1, jobs), max(1, cpus // max(1, jobs)), frames)
    todo = list(enumerate(specs))
    results: Dict[int, Dict[str, Any]] = {}
    done = 0
    try:
        while len(results) < len(specs):
            for i, slot in enumerate(pool.slots):
                if slot["task"] is None and todo:
                    index, spec = todo.pop(0)
                    slot["task"], slot["since"] = (index, spec), time.perf_counter()
                    slot["conn"].send((spec.source, spec.family, spec.candidates))
            busy = [s for s in pool.slots if s["task"] is not None]
            ready = wait([s["conn"] for s in busy] + [s["proc"].sentinel for s in busy], timeout=1.0)
            now = time.perf_counter()
            for i, slot in enumerate(pool.slots):
                if slot["task"] is None:
                    continue
                index, spec = slot["task"]
                row = None
                if slot["conn"] in ready:
                    try:
                        row = slot["conn"].recv()
                    except (EOFError, OSError):
                        row = None
                if row is None and (slot["proc"].sentinel in ready or not slot["proc"].is_alive()):
                    row = _failed(spec, "crash", f"worker died (exit code {slot['proc'].exitcode})", now - slot["since"])
                    pool.slots[i] = pool._start()
                elif row is None and now - slot["since"] > timeout:
                    slot["proc"].kill()
                    slot["proc"].join()
                    row = _failed(spec, "timeout", f"no result within {timeout:.0f} s", now - slot["since"])
                    pool.slots[i] = pool._start()
                if row is None:
                    continue
                slot["task"] = None
                results[index] = row
                done += 1
                status = "pass" if row["passed"] else f"FAIL at {row['stage']}: {row['reason']}"
                progress(f"[{done}/{len(specs)}] {row['model']} ({row['family']}, {row['seconds']:.1f} s): {status}")
    finally:
        pool.close()
    return [results[i] for i in range(len(specs))]


# ----------------------------------------------------------------------------------------------
# Report


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Pass counts per kind, counting families (a family passes when its model passes)."""
    out: Dict[str, Any] = {}
    for kind in ("cnn", "transformer", "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        families = {}
        for r in sel:
            families[(r["source"], r["family"])] = families.get((r["source"], r["family"]), True) and r["passed"]
        passed = sum(families.values())
        out[kind] = {"families": len(families), "passed": passed,
                     "rate": round(100.0 * passed / len(families), 1) if families else 0.0,
                     "models": len(sel), "models_passed": sum(r["passed"] for r in sel)}
    return out


def _mark(flag: bool) -> str:
    return "yes" if flag else "-"


def render_markdown(rows: Sequence[Dict[str, Any]], summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """COVERAGE.md's text."""
    lines = [
        "# Coverage: timm and torchvision models converted to TSM",
        "",
        "Generated by `tsm-surgery coverage` (integrations/timm_coverage.py); do not edit by hand.",
        "",
        f"Sweep: {meta['selection']}; random weights with randomised norms, clips of {meta['frames']} frames, "
        f"the smallest square input each model accepts. torch {meta['torch']}, timm {meta['timm']}, "
        f"torchvision {meta['torchvision']}. Wall time {meta['wall_s']:.0f} s with {meta['jobs']} worker(s) on "
        f"{meta['cpus']} CPU core(s).",
        "",
        "A model passes when `convert(direction=\"bi\")` changes its output (effective), `convert(direction=\"uni\")` "
        "runs, and its online form run frame by frame equals the offline uni network on every frame. "
        "`backward` is a train-mode forward/backward of the bi network (reported, not required).",
        "",
        "| kind | families | passed | rate |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in (("cnn", "convolutional"), ("transformer", "transformer / hybrid"), ("all", "all")):
        s = summary[kind]
        lines.append(f"| {label} | {s['families']} | {s['passed']} | {s['rate']:.1f}% |")
    lines += ["", "## Per model", "",
              "| model | family | kind | params (M) | input | traced | sites | layout | policy | bi effective | uni | online | backward | pass |",
              "|---|---|---|---:|---:|---|---:|---|---|---|---|---|---|---|"]
    for r in rows:
        fam = r["family"] if r["source"] == "timm" else r["family"]
        lines.append(
            f"| {r['model']} | {fam} | {r['kind']} | {r['params_m']} | {r['input_size'] or ''} | {_mark(r['traced'])} | "
            f"{r['sites']} | {r['layout']} | {r['policy']} | {_mark(r['bi'] and r['effective'])} | {_mark(r['uni'])} | "
            f"{_mark(r['online'])} | {_mark(r['backward'])} | {'**pass**' if r['passed'] else 'fail'} |")
    failures = [r for r in rows if not r["passed"] or r["reason"]]
    lines += ["", "## Failures and their reasons", ""]
    if not failures:
        lines.append("None.")
    for r in failures:
        what = "fails" if not r["passed"] else "passes, but"
        reason = r["reason"].replace("|", "\\|")
        lines.append(f"- `{r['model']}` ({r['family']}) {what} at `{r['stage']}`: {reason}")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tsm-surgery coverage``."""
    parser.add_argument("--models", help="comma-separated globs over timm names (tv:GLOB for torchvision); "
                                         "default: the smallest model of every timm and torchvision family")
    parser.add_argument("--limit", type=int, help="run only the first N models")
    parser.add_argument("--out", default="COVERAGE.md", help="markdown report (default COVERAGE.md); the JSON "
                                                            "goes next to it with a .json suffix")
    parser.add_argument("--json", help="JSON results path (default: --out with .json)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model before it is killed (default 300)")
    parser.add_argument("--frames", type=int, default=4, help="clip length T of the checks (default 4, at least 3)")


def run(args: argparse.Namespace) -> int:
    """Runs the sweep and writes the markdown and JSON reports."""
    import torch
    import timm
    import torchvision

    if args.frames < 3:
        print("--frames must be at least 3: the online check needs 3 or more frames", file=sys.stderr)
        return 2
    specs = sweep_specs(args.models, args.limit)
    if not specs:
        print(f"no model matches {args.models!r}", file=sys.stderr)
        return 1
    print(f"coverage: {len(specs)} models, {args.jobs} worker(s), {args.timeout:.0f} s each at most", flush=True)
    start = time.perf_counter()
    rows = run_sweep(specs, jobs=args.jobs, timeout=args.timeout, frames=args.frames,
                     progress=lambda line: print(line, flush=True))
    wall = time.perf_counter() - start
    summary = summarize(rows)
    meta = {
        "selection": "smallest model of every timm family and torchvision classification family"
                     if args.models is None else f"models matching {args.models!r}",
        "frames": args.frames, "jobs": args.jobs, "cpus": os.cpu_count(), "wall_s": round(wall, 1),
        "torch": torch.__version__.split("+")[0], "timm": timm.__version__,
        "torchvision": torchvision.__version__.split("+")[0], "python": platform.python_version(),
    }
    json_path = args.json or os.path.splitext(args.out)[0] + ".json"
    for path in (json_path, args.out):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "summary": summary, "results": rows}, f, indent=1)
    with open(args.out, "w") as f:
        f.write(render_markdown(rows, summary, meta))
    for kind in ("cnn", "transformer", "all"):
        s = summary[kind]
        print(f"{kind}: {s['passed']}/{s['families']} families pass ({s['rate']:.1f}%)")
    print(f"wrote {args.out} and {json_path} in {wall:.0f} s")
    return 0

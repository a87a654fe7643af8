"""Checking one model: build, find sites, convert both ways, stream, count blocks, backward.

Each check is one step function; a model's result records which flags its steps set and, on a
failure, the name of the step that raised and why. :func:`check_model` never raises.
"""

import copy
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

import tsm_surgery
from tsm_surgery.integrations.models import build_model
from tsm_surgery.integrations.models.norms import randomize_norms

from .blocks import Blocks, count_blocks
from .specs import ModelSpec, count_params, smallest

__all__ = ["Result", "Status", "check_model", "calibrate_batch_norms"]

Status = Literal["pass", "partial", "fail"]

_IMAGE_SIZES = (64, 96, 128, 160, 224, 299)


@dataclass
class Result:
    """The outcome of one model (one row of the report).

    ``status`` is ``"pass"`` when the bi conversion changes the output, the uni conversion runs
    and streams online equal to offline, and it shifts at least as many blocks as it keeps
    whole; ``"partial"`` when those checks hold but most blocks are kept whole; else ``"fail"``.
    ``failed_at`` names the step that raised (``"timeout"`` or ``"crash"`` for a lost worker).
    """

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
    blocks: Blocks | None = None  # None: not counted (the check stopped before, or an older sweep)
    failed_at: str = ""
    reason: str = ""
    note: str = ""  # what a passing check could not judge, and why
    seconds: float = 0.0

    @property
    def converted(self) -> bool:
        return self.bi and self.effective and self.uni and self.online

    @property
    def status(self) -> Status:
        if not self.converted or self.failed_at == "blocks":
            return "fail"
        return "partial" if self.blocks is not None and self.blocks.partial else "pass"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Result":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in known}
        values["blocks"] = Blocks(**row["blocks"]) if row.get("blocks") is not None else None
        return cls(**values)


@dataclass
class _Run:
    """What the steps of one check share."""

    spec: ModelSpec
    frames: int
    result: Result
    model: nn.Module | None = None
    image: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    sites: Sequence[tsm_surgery.ShiftSite] = ()
    convert_kwargs: dict[str, Any] = field(default_factory=dict)
    bi: nn.Module | None = None


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _main_output(out) -> torch.Tensor:
    tensors = _tensors(out)
    if not tensors:
        raise RuntimeError(f"the model returned no tensor ({type(out).__name__})")
    return tensors[0]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    scale = max(1.0, float(b.abs().max()))
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol * scale))


def _short(err: BaseException, limit: int = 220) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _layout(sites: Sequence[tsm_surgery.ShiftSite]) -> str:
    return "/".join(sorted({"NCHW" if s.channel_dim == 1 else ("tokens" if len(s.shape) == 3 else "NHWC")
                            for s in sites}))


def calibrate_batch_norms(model: nn.Module, batch: torch.Tensor) -> None:
    """Sets BatchNorm running statistics to those of ``batch``, then leaves the model in eval mode.

    With random statistics some deep random networks (CSPNeXt at 64 px, for one) lose their
    signal layer by layer until the output no longer depends on the input, and then no shift
    can change it; calibrated statistics keep every layer's activations at unit scale.
    """
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


def _try_size(source: str, name: str, size: int | None) -> tuple[nn.Module, int]:
    model = None
    if source == "timm" and size is not None:
        try:
            model = build_model(f"timm:{name}", img_size=size)
        except TypeError:  # a convolutional model: any size goes, no img_size argument
            pass
    model = model if model is not None else build_model(f"{source}:{name}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    run_size = size or (cfg.get("input_size") or (3, 224, 224))[-1]
    with torch.no_grad():  # both modes: the train graph may hold an auxiliary head
        model.train()
        model(torch.randn(2, 3, run_size, run_size))
        model.eval()
        model(torch.randn(1, 3, run_size, run_size))
    return model, run_size


def _step_build(run: _Run) -> None:
    """The model at the smallest square input it runs on, with random norms calibrated."""
    count_params(run.spec.source, run.result.model)  # an unknown name fails here, once, with its hint
    last_err: BaseException | None = None
    for size in _IMAGE_SIZES + (None,):
        try:
            model, size = _try_size(run.spec.source, run.result.model, size)
            break
        except Exception as err:  # too small for this model: try the next size
            last_err = err
    else:
        raise RuntimeError(f"cannot build or run {run.result.model}: {_short(last_err)}")
    run.result.input_size = size
    run.result.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    randomize_norms(model)
    calibrate_batch_norms(model, torch.randn(max(run.frames, 2), 3, size, size))
    run.model, run.image = model, torch.randn(1, 3, size, size)
    run.clip = torch.randn(run.frames, 3, size, size)


def _step_sites(run: _Run) -> None:
    res = run.result
    run.sites = tsm_surgery.find_residual_sites(run.model, run.image, all_joins=True)
    res.traced = True
    residual = [s for s in run.sites if s.kind == "residual"]
    others: dict[str, int] = {}
    for s in run.sites:
        if s.kind not in ("residual", "block_entry"):
            others[s.kind] = others.get(s.kind, 0) + 1
    res.other_joins = ", ".join(f"{k} {v}" for k, v in sorted(others.items()))
    if not residual:  # the stated policy for networks without residual joins, reported as such
        res.policy = "block_entry"
        run.convert_kwargs["no_residual"] = "block_entry"
    shifted = [s for s in run.sites if s.kind == res.policy]
    res.sites, res.layout = len(shifted), _layout(shifted)


def _step_bi(run: _Run) -> None:
    res = run.result
    with torch.no_grad():
        ref = _main_output(run.model(run.clip))
    run.bi = tsm_surgery.convert(run.model, run.frames, direction="bi", example_input=run.image, **run.convert_kwargs)
    run.bi.eval()
    with torch.no_grad():
        out = _main_output(run.bi(run.clip))
    res.bi = True
    if out.shape != ref.shape:
        raise RuntimeError(f"bi output shape {tuple(out.shape)} differs from the 2D model's {tuple(ref.shape)}")
    # float32 noise is ~1e-7 of the output's scale; a shift moves the output far more
    res.effective = float((out - ref).abs().max()) > 1e-6 * max(1e-3, float(ref.abs().max()))
    if not res.effective:
        raise RuntimeError("the bi network's output equals the 2D model's: the shifts change nothing")


def _step_online(run: _Run) -> None:
    res = run.result
    uni = tsm_surgery.convert(run.model, run.frames, direction="uni", example_input=run.image, **run.convert_kwargs)
    uni.eval()
    with torch.no_grad():
        offline = _main_output(uni(run.clip))
        res.uni = True
        online = tsm_surgery.to_online(uni)
        online.reset()
        streamed = [_main_output(online(run.clip[t:t + 1])) for t in range(run.frames)]
    bad = _mismatched_frames(streamed, offline)
    if bad:
        bad = _rejudge_in_float64(run, uni)
    if bad:
        diff = max(float((streamed[t] - offline[t:t + 1]).abs().max()) for t in bad)
        raise RuntimeError(f"online output differs from offline at frames {bad} (max abs diff {diff:.3g})")
    res.online = True


def _rejudge_in_float64(run: _Run, uni: nn.Module) -> list[int]:
    """The frames where online and offline differ, judged in float64.

    Random deep networks amplify float32 rounding (a one-frame conv and a clip conv round
    differently) far past any tolerance; the equality is exact math, so it is judged in float64.
    Frames that even float64 cannot decide (see :func:`_chaotic_frames`) are left out, with a
    note, as long as frames 0 and 1 (the first read of the caches) are judged.
    """
    with torch.no_grad():
        uni64, clip64 = copy.deepcopy(uni).double(), run.clip.double()
        offline = _main_output(uni64(clip64))
        online = tsm_surgery.to_online(uni64)
        streamed = [_main_output(online(clip64[t:t + 1])) for t in range(run.frames)]
    bad = _mismatched_frames(streamed, offline)
    if not bad:
        return bad
    chaotic = _chaotic_frames(uni64, clip64, offline)
    judged = [t for t in range(run.frames) if t not in chaotic]
    if set(bad) <= set(chaotic) and {0, 1} <= set(judged):
        run.result.note = (f"online equals offline on frames {judged}; frames {chaotic} are chaotic in this "
                           "random network (a 1e-15 relative change of the input moves its float64 output past "
                           "the tolerance), so no two ways of computing them agree")
        return []
    return bad


def _chaotic_frames(net: nn.Module, clip: torch.Tensor, output: torch.Tensor) -> list[int]:
    """Frames whose output a rounding-sized change of the input (1e-15 relative, a few float64 ulps) moves
    past the tolerance: the network amplifies rounding there beyond any check of equal math."""
    with torch.no_grad():
        nudged = _main_output(net(clip * (1 + 1e-15)))
    return _mismatched_frames(list(nudged.split(1)), output)


def _mismatched_frames(streamed: list[torch.Tensor], offline: torch.Tensor) -> list[int]:
    return [t for t in range(len(streamed)) if not _close(streamed[t], offline[t:t + 1])]


def _step_blocks(run: _Run) -> None:
    run.bi.eval()
    run.result.blocks = count_blocks(run.model, run.bi, run.sites, run.result.policy, run.image)


def _step_backward(run: _Run) -> None:
    run.bi.train()
    loss = sum(t.float().mean() for t in _tensors(run.bi(run.clip)))
    loss.backward()
    grads = [p.grad for p in run.bi.parameters() if p.grad is not None]
    if not grads or not all(bool(torch.isfinite(g).all()) for g in grads):
        raise RuntimeError("no or non-finite gradients")
    run.result.backward = True


# In order; each step needs the ones before it.
STEPS: tuple[tuple[str, Callable[[_Run], None]], ...] = (
    ("build", _step_build), ("sites", _step_sites), ("bi", _step_bi), ("online", _step_online),
    ("blocks", _step_blocks), ("backward", _step_backward),
)


def check_model(spec: ModelSpec, frames: int = 4, seed: int = 0) -> Result:
    """Runs every check on one model; never raises, a failure goes into ``failed_at`` and ``reason``.

    Args:
        spec: the model (the smallest of ``spec.candidates`` is used).
        frames: clip length ``T`` for the checks (at least 3 for the online check).
        seed: random seed for weights and inputs.

    Example:
        >>> check_model(ModelSpec("timm", "resnet", ("resnet18",)), frames=3).status
        'pass'
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    run = _Run(spec, frames, Result(model=smallest(spec), source=spec.source, family=spec.family, kind=spec.kind))
    for name, step in STEPS:
        try:
            step(run)
        except Exception as err:
            run.result.failed_at, run.result.reason = name, _short(err)
            if os.environ.get("TSM_COVERAGE_TRACEBACK"):
                traceback.print_exc()
            break
    run.result.seconds = round(time.perf_counter() - start, 2)
    return run.result

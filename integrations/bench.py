"""``tsm-surgery bench``: the shift's cost, side by side with the 2D network and the peers.

One process builds, from one set of 2D weights:

* ``2d``: the plain image network (the baseline of every ratio);
* ``ours``: ``tsm_surgery.convert(2d)``;
* ``mmaction``: MMAction2's ``ResNetTSM(shift_place="blockres")`` with the same weights (only
  for ``mmaction:resnetNN`` models);
* ``zero-fill``: ``ours`` with each shift replaced by :class:`ZeroFillShift`, the paper's
  formulation (a zero tensor, then slice assignments), written here as a reference.

and measures, with the wall-clock figures as paired interleaved ratios (every round runs each
model once, in a shuffled order, and the ratio is taken within the round; the report gives the
median over rounds and its interquartile range):

* op-level shift cost: for every shift site, the minimum over ``--op-repeats`` runs of that
  site's shift on its real input, summed over the sites, as a fraction of the minimum 2D
  forward; in eager mode and with each site's shift compiled by ``torch.compile``;
* eval latency and a training step (forward + backward);
* peak memory of a training step: the peak of the bytes held by live tensor storages, counted
  by a ``TorchDispatchMode`` that sees every tensor an op creates (forward and backward) and a
  finalizer on each storage that sees it freed; parameters, gradients and the input count
  from the start. Scratch buffers a kernel allocates and frees internally are not tensors and
  not counted; they are the same for every model;
* the online per-frame step of the uni-directional network against the 2D single frame;
* ``convert()`` time.

It writes a Markdown report (``--output``, ``BENCHMARKS.md`` by default). ``--quick`` is a
small, fast configuration for tests and CI; the defaults are the README's table.
"""

import argparse
import contextlib
import copy
import ctypes
import datetime
import io
import os
import platform
import random
import resource
import statistics
import time
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import tsm_surgery
from tsm_surgery._shift import TemporalShift

__all__ = ["add_arguments", "run", "ZeroFillShift", "LiveTensorBytes", "paired_ratios"]

# The A/A control: a deep copy of the 2D network timed like the others. Its distance from
# 1.00x is what this machine's noise alone does to a ratio.
CONTROL = "2d copy"

QUICK = dict(model="mmaction:resnet18", frames=4, clips=1, eval_size=32, train_size=32, online_size=32,
             rounds=3, repeats=1, op_repeats=3, convert_model="torchvision:resnet18", convert_repeats=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mmaction:resnet50",
                        help="mmaction:resnetNN (adds MMAction2's ResNetTSM as a peer), timm:NAME or "
                             "torchvision:NAME (default mmaction:resnet50)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip, n_segments (default 8)")
    parser.add_argument("--clips", type=int, default=1, help="clips per batch (default 1)")
    parser.add_argument("--eval-size", type=int, default=224, help="frame size for eval latency and op level")
    parser.add_argument("--train-size", type=int, default=112, help="frame size for the training step and memory")
    parser.add_argument("--online-size", type=int, default=224, help="frame size for the online step")
    parser.add_argument("--rounds", type=int, default=15, help="paired rounds per wall-clock comparison")
    parser.add_argument("--repeats", type=int, default=3,
                        help="passes per round; each model's fastest pass counts (default 3)")
    parser.add_argument("--op-repeats", type=int, default=30, help="repetitions per site for the op-level minimum")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32, or bf16/fp16 autocast around every model (default fp32)")
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also measure under torch.compile (default: on, off with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--convert-model", default="torchvision:resnet50",
                        help="the model whose convert() time is reported (default torchvision:resnet50)")
    parser.add_argument("--convert-repeats", type=int, default=3, help="convert() runs timed (median reported)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the torch.profiler table")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc settings, under which freed large buffers go back "
                             "to the OS and every new one page-faults (default: keep freed memory, see BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="a small configuration for tests/CI (seconds)")
    parser.add_argument("--output", default="BENCHMARKS.md", help="Markdown report path (default BENCHMARKS.md)")
    parser.add_argument("--seed", type=int, default=0)


# --------------------------------------------------------------------------- reference shift
class ZeroFillShift(nn.Module):
    """The paper's formulation of the bi-directional shift: zeros, then three slice copies.

    Written for comparison only: a full zero-filled output, then channels ``[0, fold)`` copied
    from the next frame, ``[fold, 2*fold)`` from the previous one and the rest in place.
    """

    def __init__(self, n_segments: int, shift_div: int = 8):
        super().__init__()
        self.n_segments, self.shift_div = n_segments, shift_div

    def forward(self, x: Tensor) -> Tensor:
        total, channels = x.shape[0], x.shape[1]
        fold = channels // self.shift_div
        clips = x.reshape(total // self.n_segments, self.n_segments, *x.shape[1:])
        out = torch.zeros_like(clips)
        out[:, :-1, :fold] = clips[:, 1:, :fold]
        out[:, 1:, fold:2 * fold] = clips[:, :-1, fold:2 * fold]
        out[:, :, 2 * fold:] = clips[:, :, 2 * fold:]
        return out.reshape(x.shape)


# --------------------------------------------------------------------------- measurement
class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages and their peak while active.

    Every tensor an ATen op returns has its storage counted once; a ``weakref.finalize`` on the
    storage subtracts it when the storage is freed. Use :meth:`track` for tensors that exist
    before the mode starts (parameters, gradients, inputs).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: Dict[int, int] = {}

    def track(self, tensor: Optional[Tensor]) -> None:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out


def paired_ratios(fns: Dict[str, Callable[[], object]], base: str, rounds: int, warmup: int = 2,
                  seed: int = 0, repeats: int = 1) -> Dict[str, Dict[str, float]]:
    """Times the callables side by side and takes their ratios to ``base`` within each round.

    A round runs every callable ``repeats`` times, each pass in a fresh shuffled order, and
    keeps each callable's fastest time: interference on a shared machine only ever adds time.

    Returns:
        name -> {"median_s", "min_s", "ratio", "ratio_p25", "ratio_p75"}; ratios are against ``base``.
    """
    rng = random.Random(seed)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        best = {name: float("inf") for name in fns}
        for _ in range(repeats):
            order = list(fns)
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                fns[name]()
                best[name] = min(best[name], time.perf_counter() - start)
        for name, seconds in best.items():
            times[name].append(seconds)
    result = {}
    for name, values in times.items():
        ratios = sorted(v / b for v, b in zip(values, times[base]))
        result[name] = dict(median_s=statistics.median(values), min_s=min(values), ratio=statistics.median(ratios),
                            ratio_p25=_quantile(ratios, 0.25), ratio_p75=_quantile(ratios, 0.75))
    return result


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def min_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------- allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    With the default settings a freed activation of tens of MiB is trimmed off the heap or
    unmapped, and the next one page-faults all its pages back in: on this machine that is a
    fifth of a ResNet-50 forward, and every extra buffer (a shifted copy) pays it again. The
    setting is what jemalloc or tcmalloc, the allocators PyTorch's CPU tuning guides recommend,
    do anyway. Returns False where it does not apply (no glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # mallopt takes a C int: 32 MiB is glibc's largest mmap threshold, 2 GiB "never trim".
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20) and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def faulted_mib(fn: Callable[[], object]) -> float:
    """MiB of memory pages first touched (minor page faults) during one call of ``fn``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / 2 ** 20


# --------------------------------------------------------------------------- models
def _build_2d(spec: str) -> Tuple[nn.Module, Optional[int]]:
    """The 2D model and, for ``mmaction:resnetNN``, its depth."""
    source, _, name = spec.rpartition(":")
    if source == "mmaction":
        if not name.startswith("resnet"):
            raise ValueError(f"mmaction models are given as mmaction:resnetNN, got {spec!r}")
        from tsm_surgery.integrations.mmaction import compat

        compat.apply()
        from mmaction.models.backbones import ResNet

        depth = int(name[len("resnet"):])
        return ResNet(depth=depth, pretrained=None, norm_eval=False), depth
    from tsm_surgery.integrations.models import build_model

    return build_model(spec), None


def _random_norms(model: nn.Module) -> None:
    # Random affine norms so that every residual branch carries signal (timm zero-initialises
    # the last norm of each branch) and the equal-output check means something.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) * 0.4 - 0.2)


def _mmaction_peer(plain: nn.Module, depth: int, frames: int) -> nn.Module:
    from mmaction.models.backbones import ResNetTSM

    peer = ResNetTSM(depth=depth, num_segments=frames, shift_div=8, shift_place="blockres",
                     pretrained2d=False, pretrained=None, norm_eval=False)
    # ResNetTSM wraps each shifted conv in its TemporalShift(net=conv): keys gain ".net".
    keys = {k.replace(".net.", "."): k for k in peer.state_dict()}
    peer.load_state_dict({keys[k]: v for k, v in plain.state_dict().items()}, strict=True)
    return peer


def _zero_fill_copy(ours: nn.Module, frames: int) -> nn.Module:
    ref = copy.deepcopy(ours)
    shifts = ref.temporal_shifts
    for key, shift in list(shifts.items()):
        shifts[key] = ZeroFillShift(frames, shift.shift_div)
    return ref


def _set_mode(model: nn.Module, training: bool) -> None:
    model.train(training)  # mmaction's ResNet.train returns None: never chain it


def _site_inputs(ours: nn.Module, x: Tensor, autocast) -> List[Tensor]:
    """The input of every shift site for batch ``x`` (the shapes the op really sees)."""
    captured: List[Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone(
        memory_format=torch.preserve_format))) for m in ours.modules() if isinstance(m, TemporalShift)]
    try:
        with torch.no_grad(), autocast():
            ours(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# --------------------------------------------------------------------------- report helpers
def _fmt_ratio(entry: Optional[Dict[str, float]]) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['ratio']:.3f}x ({entry['ratio_p25']:.3f}-{entry['ratio_p75']:.3f})"


def _fmt_ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _verdict(check: Optional[Tuple[float, float, Optional[float]]]) -> str:
    """``check`` is (value, limit, noise): holds when value <= limit; a miss smaller than the
    A/A noise is reported as within noise."""
    if check is None:
        return "n/a"
    value, limit, noise = check
    if value <= limit:
        return "holds"
    if noise is not None and value - limit <= noise:
        return f"within noise (misses by {value - limit:.3f}, A/A control off by {noise:.3f})"
    return "missed"


@contextlib.contextmanager
def _shift_ranges(model: nn.Module):
    """Labels every shift module's forward in profiler traces (profiling only)."""
    patched = []
    for module in model.modules():
        if isinstance(module, (TemporalShift, ZeroFillShift)):
            forward = module.forward

            def labelled(x, _forward=forward):
                with torch.profiler.record_function("tsm::temporal_shift"):
                    return _forward(x)

            module.forward = labelled
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


# --------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> int:
    if args.quick:
        defaults = argparse.Namespace(**{k: v for k, v in vars(args).items()})
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        base = vars(parser.parse_args([]))
        for key, value in QUICK.items():
            if getattr(defaults, key) == base[key]:  # flags given explicitly win over --quick
                setattr(args, key, value)
        if args.compile is None:
            args.compile = False
    if args.compile is None:
        args.compile = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start = os.getloadavg()
    started = time.perf_counter()
    notes: List[str] = []
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=dtype)

    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    frames, batch = args.frames, args.frames * args.clips

    plain, depth = _build_2d(args.model)
    _random_norms(plain)
    _set_mode(plain, False)
    models: Dict[str, nn.Module] = {"2d": plain, CONTROL: copy.deepcopy(plain)}
    models["ours"] = tsm_surgery.convert(plain, frames)
    if depth is not None:
        try:
            models["mmaction"] = _mmaction_peer(plain, depth, frames)
        except Exception as err:  # a peer that fails is reported, not fatal
            notes.append(f"MMAction2 ResNetTSM could not be built: {type(err).__name__}: {err}")
    models["zero-fill"] = _zero_fill_copy(models["ours"], frames)
    for model in models.values():
        model.to(memory_format=fmt)
        _set_mode(model, False)

    x_eval = torch.randn(batch, 3, args.eval_size, args.eval_size).contiguous(memory_format=fmt)
    x_train = torch.randn(batch, 3, args.train_size, args.train_size).contiguous(memory_format=fmt)

    # Equal weights, equal numbers: the converted network must compute what ResNetTSM computes.
    with torch.no_grad(), autocast():
        outs = {}
        for name, model in list(models.items()):
            try:
                outs[name] = model(x_eval).float()
            except Exception as err:
                notes.append(f"{name} failed on the eval input ({type(err).__name__}: {err}); left out.")
                del models[name]
    agreement = {}
    for name in ("mmaction", "zero-fill"):
        if name in outs:
            scale = outs[name].abs().max().item()
            agreement[name] = (outs["ours"] - outs[name]).abs().max().item() / max(scale, 1e-12)
    shift_effect = ((outs["ours"] - outs["2d"]).abs().max() / outs["2d"].abs().max()).item()

    # ---- the allocator: page faults per eval forward under glibc's defaults, then tuned
    def faults_per_forward() -> Dict[str, float]:
        return {name: faulted_mib(lambda m=m: _eval_call(m, x_eval, autocast)) for name, m in models.items()}

    faults = {"default": faults_per_forward()}
    malloc_tuned = False if args.default_malloc else keep_freed_memory()
    if malloc_tuned:
        for model in models.values():
            _eval_call(model, x_eval, autocast)
        faults["tuned"] = faults_per_forward()

    # ---- op level, eager
    sites = _site_inputs(models["ours"], x_eval, autocast)
    base_2d = min_time(lambda: _eval_call(plain, x_eval, autocast), max(3, min(10, args.op_repeats // 3)))
    op_fns: Dict[str, Callable[[Tensor], Tensor]] = {
        "ours": lambda t: tsm_surgery.temporal_shift(t, frames, 8, "bi"),
        "zero-fill": ZeroFillShift(frames, 8),
    }
    if "mmaction" in models:
        from mmaction.models.backbones.resnet_tsm import TemporalShift as MMShift

        op_fns["mmaction"] = lambda t: MMShift.shift(t, frames, shift_div=8)
    op_eager = {}
    with torch.no_grad():
        for name, fn in op_fns.items():
            try:
                op_eager[name] = sum(min_time(lambda t=t: fn(t), args.op_repeats) for t in sites)
            except Exception as err:
                notes.append(f"op level, {name}: {type(err).__name__}: {err}")
    copy_floor = sum(min_time(lambda t=t: t.clone(memory_format=torch.preserve_format), args.op_repeats)
                     for t in sites)

    # ---- end to end, eval and training step
    eval_fns = {name: (lambda m=m: _eval_call(m, x_eval, autocast)) for name, m in models.items()}
    eval_res = paired_ratios(eval_fns, "2d", args.rounds, seed=args.seed, repeats=args.repeats)
    # The op-level denominator is the fastest 2D forward seen at all: on a shared machine a
    # short minimum series can fall in a busy moment and flatter the fraction.
    base_2d = min(base_2d, eval_res["2d"]["min_s"])
    for model in models.values():
        _set_mode(model, True)
    train_fns = {name: (lambda m=m: _train_call(m, x_train, autocast)) for name, m in models.items()}
    train_res = paired_ratios(train_fns, "2d", args.rounds, seed=args.seed + 1, repeats=args.repeats)

    # ---- peak memory of a training step
    memory = {}
    for name, model in models.items():
        memory[name] = _peak_training_bytes(model, x_train, autocast)
    ours = models["ours"]
    ours.recompute_shifts = False
    memory["ours, shift outputs kept"] = _peak_training_bytes(ours, x_train, autocast)
    ours.recompute_shifts = True
    for model in models.values():
        _set_mode(model, False)

    # ---- online per-frame step vs the 2D single frame
    online_res, online_note = _online(plain, frames, args, fmt, autocast)

    # ---- torch.compile
    compiled = _compiled(models, sites, x_eval, frames, args, autocast) if args.compile else None

    # ---- convert() time
    convert_times = _convert_times(args.convert_model, frames, args.convert_repeats)

    # ---- profile of the converted network
    profile_table = _profile(ours, x_eval, autocast) if args.profile else None

    load_end = os.getloadavg()
    elapsed = time.perf_counter() - started
    report = _report(args, dict(
        depth=depth, batch=batch, notes=notes, agreement=agreement, shift_effect=shift_effect,
        sites=sites, base_2d=base_2d, op_eager=op_eager, copy_floor=copy_floor, eval=eval_res,
        train=train_res, memory=memory, online=online_res, online_note=online_note, compiled=compiled,
        convert=convert_times, profile=profile_table, faults=faults, malloc_tuned=malloc_tuned,
        load=(load_start, load_end), elapsed=elapsed,
        fmt=fmt))
    with open(args.output, "w") as f:
        f.write(report)
    print(report)
    print(f"wrote {args.output} in {elapsed:.0f} s")
    return 0


def _eval_call(model: nn.Module, x: Tensor, autocast) -> None:
    with torch.no_grad(), autocast():
        model(x)


def _train_call(model: nn.Module, x: Tensor, autocast) -> None:
    for param in model.parameters():
        param.grad = None
    with autocast():
        out = model(x)
    out.float().mean().backward()


def _peak_training_bytes(model: nn.Module, x: Tensor, autocast) -> Optional[int]:
    try:
        _train_call(model, x, autocast)  # gradients exist, as in every step after the first
        with LiveTensorBytes() as counter:
            for param in model.parameters():
                counter.track(param)
                counter.track(param.grad)
            counter.track(x)
            _train_call(model, x, autocast)
        return counter.peak
    except Exception:
        return None


def _online(plain: nn.Module, frames: int, args, fmt, autocast):
    to_online = getattr(tsm_surgery, "to_online", None)
    if to_online is None:
        return None, "pending: tsm_surgery.to_online has not landed"
    online = to_online(tsm_surgery.convert(plain, frames, direction="uni"))
    online.to(memory_format=fmt)
    _set_mode(online, False)
    frame = torch.randn(args.clips, 3, args.online_size, args.online_size).contiguous(memory_format=fmt)
    state = online.init_state(args.clips, frame_shape=tuple(frame.shape[1:]))

    def step():
        with torch.no_grad(), autocast():
            online.step(frame, state)

    control = copy.deepcopy(plain)
    res = paired_ratios({"2d": lambda: _eval_call(plain, frame, autocast), "online": step,
                         CONTROL: lambda: _eval_call(control, frame, autocast)}, "2d",
                        max(args.rounds * 2, 5), seed=args.seed + 2, repeats=args.repeats)
    return res, None


def _compiled(models, sites, x_eval, frames, args, autocast):
    """Compiled figures: the shift op alone per site, and the converted network end to end."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    out: Dict[str, object] = {}
    start = time.perf_counter()
    plain_c = torch.compile(models["2d"], fullgraph=True)
    ours_c = torch.compile(models["ours"], fullgraph=True)
    control_c = torch.compile(models[CONTROL], fullgraph=True)
    for fn in (plain_c, ours_c, control_c):
        _eval_call(fn, x_eval, autocast)
    explain = torch._dynamo.explain(models["ours"])(x_eval)
    out["graph_breaks"] = explain.graph_break_count
    out["compile_s"] = time.perf_counter() - start
    shift_c = torch.compile(lambda t: tsm_surgery.temporal_shift(t, frames, 8, "bi"), fullgraph=True, dynamic=False)
    with torch.no_grad():
        for t in sites:
            shift_c(t)
        out["op"] = sum(min_time(lambda t=t: shift_c(t), args.op_repeats) for t in sites)
        clone_c = torch.compile(lambda t: t.clone(), fullgraph=True, dynamic=False)
        for t in sites:
            clone_c(t)
        out["copy_floor"] = sum(min_time(lambda t=t: clone_c(t), args.op_repeats) for t in sites)
    out["base_2d"] = min_time(lambda: _eval_call(plain_c, x_eval, autocast), max(3, min(10, args.op_repeats // 3)))
    out["eval"] = paired_ratios({"2d": lambda: _eval_call(plain_c, x_eval, autocast),
                                 "ours": lambda: _eval_call(ours_c, x_eval, autocast),
                                 CONTROL: lambda: _eval_call(control_c, x_eval, autocast)}, "2d",
                                args.rounds, seed=args.seed + 3, repeats=args.repeats)
    out["base_2d"] = min(out["base_2d"], out["eval"]["2d"]["min_s"])
    return out


def _convert_times(spec: str, frames: int, repeats: int) -> Dict[str, object]:
    """Median convert() time, and where one convert() spends it (cProfile, cumulative)."""
    import cProfile
    import pstats

    model, _ = _build_2d(spec)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        tsm_surgery.convert(model, frames)
        times.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.enable()
    tsm_surgery.convert(model, frames)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    phases = {"deep copy of the model": ("copy.py", "deepcopy"),
              "torch.fx tracing (train and eval graphs)": ("_tracer.py", "trace_train_and_eval"),
              "site analysis incl. shape propagation": ("_sites.py", "analyse_graph"),
              "  of which: conv2d on the example input": ("~", "<built-in method torch.conv2d>")}
    total = max(v[3] for v in stats.values())
    split = {}
    for label, (file_tail, func) in phases.items():
        # cumulative time of the outermost call: the largest cumulative among matching entries
        cums = [v[3] for (f, _, name), v in stats.items() if name == func and f.endswith(file_tail)]
        split[label] = max(cums) if cums else 0.0
    return dict(spec=spec, median_s=statistics.median(times), min_s=min(times), profiled_s=total, split=split)


def _profile(model: nn.Module, x: Tensor, autocast) -> Tuple[str, Optional[float]]:
    from torch.profiler import ProfilerActivity, profile

    _set_mode(model, False)
    with _shift_ranges(model):
        _eval_call(model, x, autocast)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _eval_call(model, x, autocast)
    averages = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in averages)
    shift = sum(event.cpu_time_total for event in averages if event.key == "tsm::temporal_shift")
    table = averages.table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=34)
    return table, (shift / total if total else None)


def _report(args, r) -> str:
    lines: List[str] = []
    add = lines.append
    threads = torch.get_num_threads()
    fmt_name = "channels_last" if args.channels_last else "contiguous (NCHW)"
    dtype_name = {"fp32": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}[args.dtype]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    eval_, train, memory = r["eval"], r["train"], r["memory"]
    base_mem = memory.get("2d")

    def mem_ratio(name):
        if memory.get(name) is None or not base_mem:
            return None
        return memory[name] / base_mem

    op = {k: v / r["base_2d"] for k, v in r["op_eager"].items()}
    compiled = r["compiled"]
    op_c = None if compiled is None else compiled["op"] / compiled["base_2d"]
    online = r["online"]
    add("# Benchmarks")
    add("")
    add(f"Generated by `tsm-surgery bench{' --quick' if args.quick else ''}` "
        f"({datetime.date.today().isoformat()}); regenerate with the same command. "
        "Every wall-clock figure is a ratio against the plain 2D network measured side by side in "
        "the same process: each round runs every model in a shuffled order, `--repeats` times, "
        "and keeps each model's fastest pass; the ratio is taken within the round, and the tables "
        "give the median over rounds with the interquartile range in brackets.")
    add("")
    add("## Setup")
    add("")
    add(f"- device: CPU, {cpu}; torch {torch.__version__}; {threads} threads")
    add(f"- dtype: {dtype_name}; memory format: {fmt_name}")
    add(f"- model: `{args.model}` backbone, {args.clips} clip(s) x {args.frames} frames (batch {r['batch']}); "
        f"eval and op level at {args.eval_size}x{args.eval_size}, training step and memory at "
        f"{args.train_size}x{args.train_size}, online step at {args.online_size}x{args.online_size}")
    add(f"- shift: bi-directional, 1/8 each way, residual place, {len(r['sites'])} sites")
    add(f"- rounds per comparison: {args.rounds}, passes per round: {args.repeats}; "
        f"op-level repetitions per site: {args.op_repeats}")
    if r["malloc_tuned"]:
        add("- allocator: glibc malloc told to keep freed memory (`mallopt`: mmap threshold 32 MiB, no "
            "trimming), as jemalloc/tcmalloc would; `--default-malloc` measures glibc's defaults "
            "(see *Page faults* below)")
    else:
        add("- allocator: glibc malloc with its default settings (see *Page faults* below)")
    add(f"- machine load (1/5/15-min load average) at start {_load(r['load'][0])}, at end {_load(r['load'][1])}; "
        f"the machine is shared, so wall-clock ratios carry noise of a few percent")
    add(f"- run time: {r['elapsed']:.0f} s")
    add("")
    add("Models: **2d** the plain backbone; **2d copy** a deep copy of it (the A/A control); **ours** `tsm_surgery.convert(2d)`; **mmaction** "
        "MMAction2's `ResNetTSM(shift_place='blockres')` loaded with the same weights; **zero-fill** "
        "ours with every shift replaced by the paper's formulation (zeros, then slice copies), "
        "written in `integrations/bench.py` as a reference.")
    if r["agreement"]:
        parts = ", ".join(f"{k} {v:.1e}" for k, v in r["agreement"].items())
        add("")
        add(f"Same numbers: largest difference of ours from the peers' outputs, relative to their "
            f"largest output: {parts}; the shift changes the 2D output by {r['shift_effect']:.2f} of its largest value.")
    add("")
    add("## Headline")
    add("")
    add("The **A/A control** is a deep copy of the 2D network timed like the others: its distance "
        "from 1.00x is what the machine's noise alone does to a ratio in this run.")
    add("")
    add("| figure | ours | mmaction ResNetTSM | zero-fill (paper) | A/A control | target |")
    add("|---|---|---|---|---|---|")
    add(f"| op-level shift cost, eager (fraction of the 2D forward) | {_pct(op.get('ours'))} | "
        f"{_pct(op.get('mmaction'))} | {_pct(op.get('zero-fill'))} | | <= 1% |")
    add(f"| op-level shift cost, torch.compile | {_pct(op_c)} | n/a | n/a | | <= 0.3% |")
    add(f"| eval latency vs 2D | {_fmt_ratio(eval_.get('ours'))} | {_fmt_ratio(eval_.get('mmaction'))} | "
        f"{_fmt_ratio(eval_.get('zero-fill'))} | {_fmt_ratio(eval_.get(CONTROL))} | <= 1.02x and below mmaction |")
    add(f"| training step vs 2D | {_fmt_ratio(train.get('ours'))} | {_fmt_ratio(train.get('mmaction'))} | "
        f"{_fmt_ratio(train.get('zero-fill'))} | {_fmt_ratio(train.get(CONTROL))} | <= 1.02x and below mmaction |")
    if compiled is not None:
        add(f"| eval latency, compiled, vs compiled 2D | {_fmt_ratio(compiled['eval']['ours'])} | n/a | n/a | "
            f"{_fmt_ratio(compiled['eval'][CONTROL])} | (none set) |")
    add(f"| peak training memory vs 2D | {_x(mem_ratio('ours'))} | {_x(mem_ratio('mmaction'))} | "
        f"{_x(mem_ratio('zero-fill'))} | | <= 1.03x |")
    online_cell = r["online_note"] or _fmt_ratio(online.get("online"))
    online_control = "" if online is None else _fmt_ratio(online.get(CONTROL))
    add(f"| online per-frame step vs 2D single frame | {online_cell} | n/a (no online form) | n/a | "
        f"{online_control} | <= 1.02x |")
    add(f"| `convert()` of {r['convert']['spec']} | {r['convert']['median_s']:.2f} s (min {r['convert']['min_s']:.2f} s) "
        f"| n/a | n/a | | < 2 s |")
    add("")
    add("## Targets")
    add("")
    add("A wall-clock target missed by less than the A/A control's distance from 1.00x is marked "
        "*within noise*: this run cannot tell it from holding.")
    add("")
    ev, tr = eval_.get("ours"), train.get("ours")
    mm_ev, mm_tr = eval_.get("mmaction"), train.get("mmaction")
    online_ours = None if online is None else online["online"]

    def noise(results):
        control = None if results is None else results.get(CONTROL)
        return None if control is None else abs(control["ratio"] - 1.0)

    def at_most(entry, limit, results):
        return None if entry is None else (entry["ratio"], limit, noise(results))

    def below(entry, other, results):
        return None if (entry is None or other is None) else (entry["ratio"], other["ratio"] - 1e-12, noise(results))

    checks = [
        (f"op-level shift cost <= 1% (eager; a `clone` of the site inputs: {_pct(r['copy_floor'] / r['base_2d'])})",
         None if op.get("ours") is None else (op["ours"], 0.01, None)),
        ("op-level shift cost <= 0.3% (torch.compile"
         + ("" if compiled is None else f"; a compiled `clone`: {_pct(compiled['copy_floor'] / compiled['base_2d'])}") + ")",
         None if op_c is None else (op_c, 0.003, None)),
        ("eval <= 1.02x 2D", at_most(ev, 1.02, eval_)),
        ("eval below mmaction", below(ev, mm_ev, eval_)),
        ("training step <= 1.02x 2D", at_most(tr, 1.02, train)),
        ("training step below mmaction", below(tr, mm_tr, train)),
        ("peak training memory <= 1.03x", None if mem_ratio("ours") is None else (mem_ratio("ours"), 1.03, None)),
        ("online step <= 1.02x 2D frame", at_most(online_ours, 1.02, online)),
        ("convert() < 2 s", (r["convert"]["median_s"], 2.0, None)),
    ]
    add("| target | status |")
    add("|---|---|")
    for name, check in checks:
        add(f"| {name} | {_verdict(check)} |")
    add("")
    add("## Absolute times")
    add("")
    add("| measurement | 2d | ours | mmaction | zero-fill |")
    add("|---|---|---|---|---|")
    add("| eval forward, median | " + " | ".join(_fmt_ms(eval_.get(n, {}).get("median_s"))
                                               for n in ("2d", "ours", "mmaction", "zero-fill")) + " |")
    add("| training step, median | " + " | ".join(_fmt_ms(train.get(n, {}).get("median_s"))
                                                for n in ("2d", "ours", "mmaction", "zero-fill")) + " |")
    add(f"| eval forward, minimum over all runs (op-level denominator) | {_fmt_ms(r['base_2d'])} | | | |")
    add("| sum over sites of the shift's minimum | | " + " | ".join(
        _fmt_ms(r["op_eager"].get(n)) for n in ("ours", "mmaction", "zero-fill")) + " |")
    add("| peak training memory | " + " | ".join(_mib(memory.get(n)) for n in ("2d", "ours", "mmaction", "zero-fill")) + " |")
    add("")
    add(f"A plain copy of every site's input (`clone`, the least any out-of-place shift must move: one "
        f"read and one write of the tensor) sums to {_fmt_ms(r['copy_floor'])}, "
        f"{_pct(r['copy_floor'] / r['base_2d'])} of the 2D forward; ours is {r['op_eager'].get('ours', float('nan')) / r['copy_floor']:.2f}x that floor.")
    add("")
    kept = memory.get("ours, shift outputs kept")
    add("Peak memory method: a `TorchDispatchMode` counts the bytes of every tensor storage an op "
        "creates during one training step (forward and backward) and a finalizer on each storage "
        "subtracts them when it is freed; parameters, their gradients and the input are counted from "
        "the start. The peak of that running sum is reported. Kernel-internal scratch buffers are not "
        "tensors and are not counted. "
        f"Ours with the shift outputs kept for backward (`net.recompute_shifts = False`): {_mib(kept)} "
        f"({_x(mem_ratio('ours, shift outputs kept'))} the 2D model): the first conv of each branch "
        "saves its input for the weight gradient, and a shifted copy is one extra activation per site; "
        "by default the converted network saves the shift's input (alive anyway) and rebuilds the copy "
        "in backward.")
    add("")
    conv = r["convert"]
    add(f"`convert()` of {conv['spec']}: median {conv['median_s']:.2f} s over the timed runs; one run under "
        f"cProfile took {conv['profiled_s']:.2f} s, spent as follows (cumulative):")
    add("")
    add("| phase | seconds |")
    add("|---|---|")
    for label, seconds in conv["split"].items():
        add(f"| {label} | {seconds:.2f} |")
    add("")
    add("## Page faults")
    add("")
    add("Memory first touched during one eval forward (minor page faults x page size), per model:")
    add("")
    names = list(r["faults"]["default"])
    add("| malloc settings | " + " | ".join(names) + " |")
    add("|---|" + "---|" * len(names))
    for setting, label in (("default", "glibc defaults"), ("tuned", "freed memory kept (this run's timings)")):
        if setting in r["faults"]:
            add(f"| {label} | " + " | ".join(f"{r['faults'][setting][n]:.0f} MiB" for n in names) + " |")
    add("")
    add("Under glibc's defaults a freed activation of tens of MiB goes back to the OS and the next "
        "one faults its pages in again, which costs the 2D network itself a large share of its "
        "forward and charges every extra buffer (a shifted copy per site) the same again. With "
        "freed memory kept, no model faults and the ratios measure the computation.")
    add("")
    add("## Online step")
    add("")
    if r["online_note"]:
        add(r["online_note"])
    else:
        add(f"`to_online(convert(2d, direction='uni'))`, {args.clips} stream(s), explicit state "
            f"(`step(frame, state)`), against the 2D forward of the same frame: "
            f"{_fmt_ratio(online['online'])}; medians {_fmt_ms(online['2d']['median_s'])} (2D) and "
            f"{_fmt_ms(online['online']['median_s'])} (online).")
    add("")
    add("## torch.compile")
    add("")
    if compiled is None:
        add("Not measured in this run (`--no-compile` or `--quick`).")
    else:
        add(f"`torch.compile(fullgraph=True)` of the 2D and the converted network (eval); graph breaks in the "
            f"converted network per `torch._dynamo.explain`: {compiled['graph_breaks']}; compile time of both "
            f"{compiled['compile_s']:.0f} s.")
        add("")
        add(f"- op level: each site's shift compiled alone, summed minimum {_fmt_ms(compiled['op'])}, "
            f"{_pct(op_c)} of the compiled 2D forward ({_fmt_ms(compiled['base_2d'])}); a compiled `clone` of "
            f"every site input, the floor for a shift that is not fused into its producer, is "
            f"{_fmt_ms(compiled['copy_floor'])}, {_pct(compiled['copy_floor'] / compiled['base_2d'])}")
        add(f"- end to end, eval: compiled ours vs compiled 2D {_fmt_ratio(compiled['eval']['ours'])} "
            f"(A/A control {_fmt_ratio(compiled['eval'][CONTROL])}); medians "
            f"{_fmt_ms(compiled['eval']['2d']['median_s'])} and {_fmt_ms(compiled['eval']['ours']['median_s'])}")
    add("")
    add("## Where the remaining cost comes from")
    add("")
    share = r["profile"][1] if r["profile"] else None
    add(f"- The shift cannot be free in an out-of-place network: the residual shortcut needs the "
        f"unshifted tensor, so the branch's first layer must read a shifted copy. One read and one write "
        f"of each site's input is the floor; measured as a plain `clone` of every site input it is "
        f"{_pct(r['copy_floor'] / r['base_2d'])} of the 2D forward here, and ours costs "
        f"{r['op_eager'].get('ours', float('nan')) / r['copy_floor']:.2f}x that floor (no zero fill, every "
        f"output element written once). The op-level figure is a minimum over repetitions on a warm "
        f"cache; inside the network the input arrives from the previous block and the copy gets a fresh "
        f"buffer, so it costs more"
        + (f": the profile below puts the shifts at {_pct(share)} of the eval forward's CPU time." if share is not None else "."))
    add("- Under `torch.compile` the convolutions stay oneDNN extern kernels, run channels-last, so "
        "inductor cannot fold the shift into a convolution's input read. The shift compiles to one "
        "select over the batch rolled by a frame (`where`, not `cat`: inductor on CPU lays a `cat` out "
        "contiguous, which cost two layout transposes per site and 1.3-1.4x end to end), fused into "
        "the kernel that produces the block input. That loop still reads three frames to write one "
        "(`where` evaluates both of its sides), which is the compiled op-level figure; it runs once "
        "per site on data the previous loop just wrote.")
    add("- End-to-end wall-clock ratios on this shared 2-core machine move by as much as the A/A "
        "control shows: two copies of the same network differ by that much in the same run, more than "
        "the shift's own cost. The op-level, memory and compiled-kernel figures are the robust ones.")
    add("- A training step runs the shift three times per site: forward, the reverse shift of the "
        "gradient, and the rebuild in backward that keeps peak memory at the 2D model's (each a copy). "
        "`net.recompute_shifts = False` drops the rebuild and pays one activation per site instead.")
    add("- The online step swaps the cache into the site's activation in place around the branch's "
        "first layer (three copies of 1/8 of the channels, not a shifted copy of all of them); what is "
        "left is those copies, the state handling of `step` and per-call Python overhead, a larger "
        "share at one frame than in a clip batch.")
    add("- Under glibc's default malloc settings every new activation of tens of MiB page-faults its "
        "memory in, and the converted network, with one more buffer per site, faults more (see *Page "
        "faults*). On CPU, run with jemalloc or tcmalloc (`LD_PRELOAD`), or "
        "`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`, as this bench does by default.")
    add("- `convert()` traces the train and eval graphs and propagates shapes with fake tensors; the "
        "deep copy that keeps the caller's model untouched is a large part of what is left (see the split above).")
    add("")
    if r["profile"]:
        add("## Profile of the converted network (eval forward)")
        add("")
        add("torch.profiler, CPU, one eval forward of ours after a warm-up; each shift is labelled "
            "`tsm::temporal_shift` (its copies appear inside it as `aten::copy_`).")
        add("")
        add("```")
        add(r["profile"][0].rstrip())
        add("```")
        add("")
    if r["notes"]:
        add("## Notes")
        add("")
        for note in r["notes"]:
            add(f"- {note}")
        add("")
    return "\n".join(lines) + "\n"


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def _mib(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.1f} MiB"


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)

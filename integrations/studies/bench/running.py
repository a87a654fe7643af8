"""Running: one bench run from :class:`Settings` to a :class:`BenchResult`, nothing printed.

Each step measures one figure on the models :mod:`.peers` builds, with the tools of
:mod:`.measure`; the same steps run on CPU and CUDA, where only the clock (CUDA events), the
memory counter (``torch.cuda.max_memory_allocated``) and the extra throughput step differ.

Example:
    >>> result = run_bench(Settings(model="torchvision:resnet18", frames=4, eval_size=32, train_size=32,
    ...                             online_size=32, rounds=2, op_repeats=2, compile=False, profile=False,
    ...                             convert_model="torchvision:resnet18", convert_repeats=1))
    >>> result.eval["ours"]["ratio"] > 0
    True
"""

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import tsm_surgery

from . import machine as machine_info
from .breakdown import ConvertTimes, convert_times, profile_forward
from .measure import (
    CONTROL,
    clock_for,
    count_packs,
    faulted_mib,
    interleaved_min_times,
    keep_freed_memory,
    min_time,
    paired_ratios,
    peak_bytes,
)
from .peers import ZeroFillShift, build_models, set_mode, shift_inputs

__all__ = ["Settings", "BenchResult", "Compiled", "Throughput", "run_bench", "DTYPES"]

Paired = dict[str, dict[str, float]]  # name -> paired_ratios entry
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """What to measure; the defaults are the README's table (``--quick`` shrinks them)."""

    model: str = "mmaction:resnet50"
    frames: int = 8
    clips: int = 1
    eval_size: int = 224
    train_size: int = 112
    online_size: int = 224
    rounds: int = 15
    repeats: int = 3
    op_repeats: int = 30
    dtype: str = "fp32"  # a key of DTYPES: autocast around every model unless fp32
    channels_last: bool = False
    compile: bool = True
    convert_model: str = "torchvision:resnet50"
    convert_repeats: int = 3
    profile: bool = True
    default_malloc: bool = False
    device: str = "cpu"
    max_clips: int = 256  # the throughput search on CUDA stops here
    seed: int = 0
    quick: bool = False


@dataclass
class Compiled:
    graph_breaks: int
    compile_s: float
    op_s: float  # each site's shift compiled alone: the sum of the minima
    copy_floor_s: float  # a compiled clone of every site input
    base_2d_s: float
    eval: Paired


@dataclass
class Throughput:
    """Eval throughput at the batch that fills the GPU (CUDA only)."""

    clips: int
    search: list[tuple[int, float]]  # (clips, 2D clips/s) tried while growing the batch
    eval: Paired

    def clips_per_s(self, name: str) -> float | None:
        entry = self.eval.get(name)
        return None if entry is None else self.clips / entry["median_s"]


@dataclass
class BenchResult:
    settings: Settings
    machine: machine_info.Machine
    batch: int
    sites: int
    agreement: dict[str, float]  # peer -> max |ours - peer| / max |peer|
    shift_effect: float  # max |ours - 2d| / max |2d|
    base_2d_s: float  # fastest 2D eval forward seen: the op-level denominator
    op_eager: dict[str, float]  # name -> summed per-site minimum of the shift, seconds
    copy_floor_s: float
    op_in_place_s: float | None  # ours' eval form: the slots moved in place and back, summed per-site minimum
    packs_per_step: int | None  # tensors ours' recompute hooks pack through Python in one training step
    eval: Paired
    train: Paired
    memory: dict[str, int | None]
    online: Paired
    convert: ConvertTimes
    compiled: Compiled | None = None
    profile: tuple[str, float | None] | None = None  # (table, shift share of the forward)
    faults: dict[str, dict[str, float]] = field(default_factory=dict)  # CPU: malloc setting -> MiB per model
    malloc_tuned: bool = False
    throughput: Throughput | None = None
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass
class _Run:
    """What every step needs: the settings, the device, its clock and the autocast context."""

    settings: Settings
    device: torch.device
    fmt: torch.memory_format

    @property
    def clock(self):
        return clock_for(self.device)

    def autocast(self):
        dtype = DTYPES[self.settings.dtype]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def input(self, batch: int, size: int) -> Tensor:
        return torch.randn(batch, 3, size, size).to(self.device).contiguous(memory_format=self.fmt)

    def paired(self, fns, rounds: int, seed_offset: int) -> Paired:
        s = self.settings
        return paired_ratios(fns, "2d", rounds, seed=s.seed + seed_offset, repeats=s.repeats, clock=self.clock)

    def eval_call(self, model: nn.Module, x: Tensor) -> None:
        with torch.no_grad(), self.autocast():
            model(x)

    def train_call(self, model: nn.Module, x: Tensor) -> None:
        for param in model.parameters():
            param.grad = None
        with self.autocast():
            out = model(x)
        out.float().mean().backward()


def run_bench(settings: Settings) -> BenchResult:
    """Builds the models, measures every figure and returns them (see :class:`BenchResult`)."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    run = _Run(settings, device, torch.channels_last if settings.channels_last else torch.contiguous_format)
    machine = machine_info.describe(device)
    notes: list[str] = []
    models, _ = build_models(settings.model, settings.frames, notes)
    for model in models.values():
        model.to(device=device, memory_format=run.fmt)
    batch = settings.frames * settings.clips
    x_eval, x_train = run.input(batch, settings.eval_size), run.input(batch, settings.train_size)
    agreement, shift_effect = _agreement(run, models, x_eval, notes)
    faults, tuned = _faults(run, models, x_eval) if device.type == "cpu" else ({}, False)
    sites = shift_inputs(models["ours"], x_eval, run.autocast)
    base_2d = min_time(lambda: run.eval_call(models["2d"], x_eval), _base_repeats(settings), run.clock)
    op_eager, copy_floor, op_in_place = _op_level(run, models, sites, notes)
    eval_res = run.paired({n: (lambda m=m: run.eval_call(m, x_eval)) for n, m in models.items()}, settings.rounds, 0)
    # The op-level denominator is the fastest 2D forward seen at all: on a shared machine a
    # short minimum series can fall in a busy moment and flatter the fraction.
    base_2d = min(base_2d, eval_res["2d"]["min_s"])
    for model in models.values():
        set_mode(model, True)
    train_res = run.paired({n: (lambda m=m: run.train_call(m, x_train)) for n, m in models.items()},
                           settings.rounds, 1)
    memory = _memory(run, models, x_train)
    packs = count_packs(lambda: run.train_call(models["ours"], x_train))
    for model in models.values():
        set_mode(model, False)
    result = BenchResult(
        settings=settings, machine=machine, batch=batch, sites=len(sites), agreement=agreement,
        shift_effect=shift_effect, base_2d_s=base_2d, op_eager=op_eager, copy_floor_s=copy_floor,
        op_in_place_s=op_in_place, packs_per_step=packs,
        eval=eval_res, train=train_res, memory=memory, online=_online(run, models["2d"]),
        compiled=_compiled(run, models, sites, x_eval) if settings.compile else None,
        convert=convert_times(settings.convert_model, settings.frames, settings.convert_repeats),
        profile=profile_forward(models["ours"], lambda: run.eval_call(models["ours"], x_eval), run.device)
        if settings.profile else None,
        faults=faults, malloc_tuned=tuned, notes=notes)
    if device.type == "cuda":
        result.throughput = _throughput(run, models)
    machine.finish()
    result.elapsed_s = time.perf_counter() - started
    return result


def _base_repeats(settings: Settings) -> int:
    return max(3, min(10, settings.op_repeats // 3))


def _agreement(run: _Run, models: dict[str, nn.Module], x: Tensor, notes: list[str]) -> tuple[dict[str, float], float]:
    """Equal weights, equal numbers: ours against the peers, and how much the shift changes the 2D output.

    A model that fails on the input is left out of the run with a note.
    """
    outs = {}
    with torch.no_grad(), run.autocast():
        for name, model in list(models.items()):
            try:
                outs[name] = model(x).float()
            except Exception as err:
                notes.append(f"{name} failed on the eval input ({type(err).__name__}: {err}); left out.")
                del models[name]
    agreement = {name: _relative(outs["ours"], outs[name]) for name in ("mmaction", "zero-fill") if name in outs}
    return agreement, _relative(outs["ours"], outs["2d"])


def _relative(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def _faults(run: _Run, models: dict[str, nn.Module], x: Tensor) -> tuple[dict[str, dict[str, float]], bool]:
    """Page faults per eval forward under glibc's defaults, then with freed memory kept (CPU)."""

    def per_forward() -> dict[str, float]:
        return {name: faulted_mib(lambda m=m: run.eval_call(m, x)) for name, m in models.items()}

    faults = {"default": per_forward()}
    tuned = False if run.settings.default_malloc else keep_freed_memory()
    if tuned:
        for model in models.values():
            run.eval_call(model, x)
        faults["tuned"] = per_forward()
    return faults, tuned


_CLONE, _IN_PLACE = "clone", "in place"  # op-level entries that are not a peer's shift


def _op_level(run: _Run, models: dict[str, nn.Module], sites: list[Tensor],
              notes: list[str]) -> tuple[dict[str, float], float, float]:
    """Summed per-site minima: each peer's shift, a clone of the input, and ours' eval form in place.

    Per site the candidates are timed in turns (:func:`interleaved_min_times`), so their ratios
    compare the same moments of the machine. Ours' eval form moves the slots in place and puts
    them back (``swap=True`` and ``restore``).
    """
    frames = run.settings.frames
    shift = tsm_surgery.TemporalShift(frames, 8, "bi")
    op_fns: dict[str, Callable[[Tensor], object]] = {
        "ours": lambda t: tsm_surgery.temporal_shift(t, frames, 8, "bi"),
        "zero-fill": ZeroFillShift(frames, 8),
        _CLONE: lambda t: t.clone(memory_format=torch.preserve_format),
        _IN_PLACE: lambda t: tsm_surgery.TemporalShift.restore(shift(t, swap=True)),
    }
    if "mmaction" in models:
        from mmaction.models.backbones.resnet_tsm import TemporalShift as MMShift

        op_fns["mmaction"] = lambda t: MMShift.shift(t, frames, shift_div=8)
    totals, failed = dict.fromkeys(op_fns, 0.0), set()
    with torch.no_grad():
        for i, t in enumerate(sites):
            working = {}
            for name, fn in op_fns.items():
                try:
                    if name not in failed:
                        fn(t)  # a warm-up, and a peer that fails is reported and left out
                        working[name] = lambda t=t, fn=fn: fn(t)
                except Exception as err:
                    notes.append(f"op level, {name}: {type(err).__name__}: {err}")
                    failed.add(name)
            for name, seconds in interleaved_min_times(working, run.settings.op_repeats, run.clock, seed=i).items():
                totals[name] += seconds
    op_eager = {name: total for name, total in totals.items() if name not in failed | {_CLONE, _IN_PLACE}}
    return op_eager, totals[_CLONE], totals[_IN_PLACE]


def _memory(run: _Run, models: dict[str, nn.Module], x: Tensor) -> dict[str, int | None]:
    """Peak bytes of one training step per model (models in train mode), and ours keeping shift outputs."""

    def peak(model: nn.Module) -> int | None:
        try:
            run.train_call(model, x)  # gradients exist, as in every step after the first
            return peak_bytes(lambda: run.train_call(model, x),
                              lambda: [x, *model.parameters(), *(p.grad for p in model.parameters())], run.device)
        except Exception:
            return None

    memory = {name: peak(model) for name, model in models.items()}
    ours = models["ours"]
    ours.recompute_shifts = False
    memory["ours, shift outputs kept"] = peak(ours)
    ours.recompute_shifts = True
    return memory


def _online(run: _Run, plain: nn.Module) -> Paired:
    """The online per-frame step (explicit state) against the 2D forward of the same frame."""
    s = run.settings
    online = tsm_surgery.to_online(tsm_surgery.convert(plain, s.frames, direction="uni"))
    online.to(device=run.device, memory_format=run.fmt)
    set_mode(online, False)
    frame = run.input(s.clips, s.online_size)
    with run.autocast():  # under autocast the caches take the dtype autocast gives each site
        state = online.init_state(s.clips, frame_shape=tuple(frame.shape[1:]))

    def step():
        with torch.no_grad(), run.autocast():
            online.step(frame, state)

    control = copy.deepcopy(plain)
    fns = {"2d": lambda: run.eval_call(plain, frame), "online": step, CONTROL: lambda: run.eval_call(control, frame)}
    return run.paired(fns, max(s.rounds * 2, 5), 2)


def _compiled(run: _Run, models: dict[str, nn.Module], sites: list[Tensor], x: Tensor) -> Compiled:
    """The shift op alone per site, and the converted network end to end, under ``torch.compile``."""
    import torch._dynamo

    s = run.settings
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    start = time.perf_counter()
    nets = {name: torch.compile(models[name], fullgraph=True) for name in ("2d", "ours", CONTROL)}
    for net in nets.values():
        run.eval_call(net, x)
    graph_breaks = torch._dynamo.explain(models["ours"])(x).graph_break_count
    compile_s = time.perf_counter() - start
    shift_c = torch.compile(lambda t: tsm_surgery.temporal_shift(t, s.frames, 8, "bi"), fullgraph=True, dynamic=False)
    clone_c = torch.compile(lambda t: t.clone(), fullgraph=True, dynamic=False)
    with torch.no_grad():
        for t in sites:  # compile for every site shape before timing
            shift_c(t)
            clone_c(t)
        minima = [interleaved_min_times({"shift": lambda t=t: shift_c(t), "clone": lambda t=t: clone_c(t)},
                                        s.op_repeats, run.clock, seed=i) for i, t in enumerate(sites)]
        op, floor = sum(m["shift"] for m in minima), sum(m["clone"] for m in minima)
    base = min_time(lambda: run.eval_call(nets["2d"], x), _base_repeats(s), run.clock)
    eval_res = run.paired({name: (lambda n=net: run.eval_call(n, x)) for name, net in nets.items()}, s.rounds, 3)
    return Compiled(graph_breaks=graph_breaks, compile_s=compile_s, op_s=op, copy_floor_s=floor,
                    base_2d_s=min(base, eval_res["2d"]["min_s"]), eval=eval_res)


def _throughput(run: _Run, models: dict[str, nn.Module]) -> Throughput:
    """Eval clips/s at a batch that fills the GPU, side by side.

    The batch doubles from ``--clips`` while the 2D network's clips/s still grows by 5% or more,
    the forward stays under half the GPU's memory and ``max_clips`` is not passed.
    """
    s = run.settings
    total = torch.cuda.get_device_properties(run.device).total_memory
    search: list[tuple[int, float]] = []
    clips = s.clips
    while True:
        try:
            x = run.input(clips * s.frames, s.eval_size)
            torch.cuda.reset_peak_memory_stats(run.device)
            seconds = min_time(lambda x=x: run.eval_call(models["2d"], x), 3, run.clock)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            x = None
        search.append((clips, clips / seconds))
        grew = len(search) < 2 or search[-1][1] >= 1.05 * search[-2][1]
        if not grew or torch.cuda.max_memory_allocated(run.device) > total / 2 or clips * 2 > s.max_clips:
            break
        clips *= 2
    torch.cuda.empty_cache()
    # The size with the most clips/s (a size that stopped growing adds nothing).
    best = max(search, key=lambda item: item[1])[0] if search else s.clips
    x = run.input(best * s.frames, s.eval_size)
    fns = {name: (lambda m=m: run.eval_call(m, x)) for name, m in models.items()}
    return Throughput(clips=best, search=search, eval=run.paired(fns, max(3, s.rounds // 3), 4))

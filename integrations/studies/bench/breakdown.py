"""Where the time goes: ``convert()`` split by cProfile, an eval forward by torch.profiler.

Both name only the standard library's and torch's functions, and the shift modules by a
profiler range around their calls (:func:`.peers.labelled_shifts`): never the core's private
functions, which may move.
"""

import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import tsm_surgery

from .peers import SHIFT_LABEL, build_2d, labelled_shifts, set_mode

__all__ = ["ConvertTimes", "convert_times", "profile_forward"]


@dataclass
class ConvertTimes:
    spec: str
    median_s: float
    min_s: float
    profiled_s: float
    split: dict[str, float]  # phase -> seconds of one convert() under cProfile


def convert_times(spec: str, frames: int, repeats: int) -> ConvertTimes:
    """Median ``convert()`` time, and where one ``convert()`` spends it (cProfile, cumulative).

    The split names only the standard library's and torch's functions (deep copy, torch.fx
    tracing, the convolutions the shape propagation runs); the rest is the site analysis and
    the rewrite.
    """
    model, _ = build_2d(spec)
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
    total = max(v[3] for v in stats.values())

    def cumulative(file_tail: str, func: str) -> float:
        # the outermost call's cumulative time: the largest among matching entries
        return max((v[3] for (f, _, name), v in stats.items() if name == func and f.endswith(file_tail)), default=0.0)

    split = {"deep copy of the model": cumulative("copy.py", "deepcopy"),
             "torch.fx tracing (train and eval graphs)": cumulative("_symbolic_trace.py", "trace")}
    split["site analysis, shape propagation and the rewrite"] = max(0.0, total - sum(split.values()))
    split["  of which: conv2d on the example input"] = cumulative("~", "<built-in method torch.conv2d>")
    return ConvertTimes(spec=spec, median_s=statistics.median(times), min_s=min(times), profiled_s=total, split=split)


def profile_forward(model: nn.Module, forward: Callable[[], object],
                    device: torch.device) -> tuple[str, float | None]:
    """torch.profiler table of one call of ``forward`` (after a warm-up), and the shifts' share of its time.

    On CUDA the share is of device time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    set_mode(model, False)
    with labelled_shifts(model):
        forward()
        with profile(activities=activities) as prof:
            forward()
            if cuda:
                torch.cuda.synchronize(device)
    averages = prof.key_averages()
    self_key, total_key = ("self_device_time_total", "device_time_total") if cuda else \
        ("self_cpu_time_total", "cpu_time_total")
    total = sum(getattr(event, self_key) for event in averages)
    shift = sum(getattr(event, total_key) for event in averages if event.key == SHIFT_LABEL)
    table = averages.table(sort_by=total_key, row_limit=14, max_name_column_width=34)
    return table, (shift / total if total else None)

"""Measuring: clocks, paired interleaved ratios with an A/A control, peak memory, page faults.

Nothing here knows about TSM: every function takes callables or tensors, so the same tools
time the shift, a whole network or anything else (``tsm-surgery bench`` and the ablations).

Example:
    >>> import torch
    >>> x = torch.randn(256, 256)
    >>> res = paired_ratios({"a": lambda: x @ x, "a again": lambda: x @ x}, "a", rounds=3)
    >>> sorted(res["a again"])
    ['median_s', 'min_s', 'ratio', 'ratio_p25', 'ratio_p75']
"""

import ctypes
import random
import resource
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CONTROL", "Clock", "wall_time", "cuda_time", "clock_for", "paired_ratios", "min_time",
           "interleaved_min_times", "LiveTensorBytes", "count_packs", "peak_bytes", "keep_freed_memory", "faulted_mib"]

# The A/A control: a deep copy of the baseline timed like the others. Its distance from 1.00x
# is what the machine's noise alone does to a ratio.
CONTROL = "2d copy"

Clock = Callable[[Callable[[], object]], float]  # runs fn once, returns its seconds


def wall_time(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes on the host clock (CPU work)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_time(fn: Callable[[], object]) -> float:
    """Seconds between CUDA events recorded before and after ``fn`` on the current stream.

    The end event is waited for, so the next call starts on an idle stream: host overhead that
    leaves the GPU waiting counts, as it does in a real loop of forwards.
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def clock_for(device: torch.device) -> Clock:
    """:func:`cuda_time` for a CUDA device, :func:`wall_time` otherwise."""
    return cuda_time if torch.device(device).type == "cuda" else wall_time


def paired_ratios(fns: dict[str, Callable[[], object]], base: str, rounds: int, warmup: int = 2,
                  seed: int = 0, repeats: int = 1, clock: Clock = wall_time) -> dict[str, dict[str, float]]:
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
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        best = {name: float("inf") for name in fns}
        for _ in range(repeats):
            order = list(fns)
            rng.shuffle(order)
            for name in order:
                best[name] = min(best[name], clock(fns[name]))
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


def min_time(fn: Callable[[], object], repeats: int, clock: Clock = wall_time) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds."""
    return min(clock(fn) for _ in range(max(1, repeats)))


def interleaved_min_times(fns: dict[str, Callable[[], object]], repeats: int, clock: Clock = wall_time,
                          seed: int = 0) -> dict[str, float]:
    """The fastest of ``repeats`` timed calls of each callable, taken in turns (a shuffled order per turn).

    Memory-bound copies share the host's memory bandwidth with other tenants: timed one after
    the other, two copies can meet different conditions; taken in turns, the minima come from
    the same stretch of time. (Between processes their ratio still swings, by up to 2x on the
    2-core host the committed figures come from.) Each timed call follows an untimed one of the
    same callable, so each is timed warm (its data in cache), as a series of one would be.
    """
    rng = random.Random(seed)
    best = {name: float("inf") for name in fns}
    for _ in range(max(1, repeats)):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            fns[name]()
            best[name] = min(best[name], clock(fns[name]))
    return best


def count_packs(fn: Callable[[], object]) -> int:
    """How many tensors the converted network's recompute hooks pack through Python while ``fn`` runs.

    Counted from outside with the Python profiler: the calls of the pack hook that
    ``tsm_surgery`` installs around the consumers of each shift output (one call per saved
    tensor that goes through Python rather than staying inside autograd).
    """
    count = 0

    def profile(frame, event, _arg):
        nonlocal count
        code = frame.f_code
        if event == "call" and code.co_name == _PACK_HOOK[1] and frame.f_globals.get("__name__") == _PACK_HOOK[0]:
            count += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return count


_PACK_HOOK = ("tsm_surgery._recompute", "_pack")  # module and name of the saved-tensor pack hook


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
        self._sizes: dict[int, int] = {}

    def track(self, tensor: Tensor | None) -> None:
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


def peak_bytes(fn: Callable[[], object], held: Callable[[], Iterable[Tensor | None]],
               device: torch.device) -> int:
    """Peak bytes of the tensors alive during one call of ``fn``, counting ``held()`` from the start.

    ``held()`` lists the tensors the call owns before it starts (parameters, gradients, input);
    it is a function so that the count keeps no reference to them (a gradient the step frees
    must be freed). On CPU the tensors are counted by :class:`LiveTensorBytes`. On CUDA the
    figure is ``torch.cuda.max_memory_allocated`` during the call, less what was allocated
    before it, plus the bytes of ``held()``: other models that share the GPU do not count.

    Example:
        >>> x = torch.zeros(1000, dtype=torch.uint8)
        >>> peak_bytes(lambda: x + 1, lambda: [x], torch.device("cpu"))
        2000
    """
    if torch.device(device).type != "cuda":
        with LiveTensorBytes() as counter:
            _track(counter, held())
            fn()
        return counter.peak
    own = _storage_bytes(held())
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before + own


def _track(counter: LiveTensorBytes, tensors: Iterable[Tensor | None]) -> None:
    for tensor in tensors:
        counter.track(tensor)


def _storage_bytes(tensors: Iterable[Tensor | None]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if isinstance(t, Tensor)}
    return sum(storages.values())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    With the default settings a freed activation of tens of MiB is trimmed off the heap or
    unmapped, and the next one page-faults all its pages back in, which can cost a fifth of a
    ResNet-50 forward; every extra buffer (a shifted copy) pays it again. The setting is what
    jemalloc or tcmalloc, the allocators PyTorch's CPU tuning guides recommend, do anyway.
    Returns False where it does not apply (no glibc).
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

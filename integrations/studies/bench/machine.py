"""What machine a bench run measured: CPU model, cores, threads, load, and the GPU when used.

Example:
    >>> m = describe(torch.device("cpu"))
    >>> m.logical_cpus >= 1 and m.torch_threads >= 1
    True
"""

import os
import platform
import time
from dataclasses import dataclass, field

import torch

__all__ = ["Machine", "describe", "load_average", "vector_isa"]


@dataclass
class Machine:
    """The host and device of one run. ``load_end`` and ``own_load`` are filled by :meth:`finish`."""

    cpu: str
    physical_cores: int | None
    logical_cpus: int
    usable_cpus: int  # the process's CPU affinity (containers and taskset narrow it)
    torch_threads: int
    torch_version: str
    load_start: tuple[float, float, float]
    vector_isa: str = ""  # the x86 vector extensions that set conv and int8 speed ("AVX2, no VNNI")
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    own_load: float = 0.0  # this process's CPU seconds per second of the run: its share of load_end
    gpu: str | None = None  # name, memory and compute capability
    gpu_memory_bytes: int | None = None
    cuda_version: str | None = None
    _started: tuple[float, float] = field(default_factory=lambda: (time.perf_counter(), time.process_time()))

    def finish(self) -> None:
        """Records the load at the end of the run and how much of it the run's own threads were."""
        self.load_end = load_average()
        wall = time.perf_counter() - self._started[0]
        self.own_load = (time.process_time() - self._started[1]) / wall if wall > 0 else 0.0

    @property
    def device_name(self) -> str:
        return self.gpu.split(",")[0] if self.gpu else f"CPU, {self.cpu}"

    def lines(self) -> list:
        """Markdown bullet lines for the report's setup section."""
        cores = f"{self.physical_cores} physical cores, " if self.physical_cores else ""
        isa = f" ({self.vector_isa})" if self.vector_isa else ""
        out = [f"- CPU: {self.cpu}{isa}; {cores}{self.logical_cpus} logical CPUs, {self.usable_cpus} usable by this "
               f"process; torch {self.torch_version} with {self.torch_threads} threads"]
        if self.gpu:
            out.append(f"- GPU: {self.gpu}; CUDA {self.cuda_version}")
        out.append(f"- load average (1/5/15 min) at start {_fmt_load(self.load_start)}, at end "
                   f"{_fmt_load(self.load_end)}: {self.busy_text()}")
        return out

    def busy_text(self) -> str:
        """How busy other processes kept the host, in words (they add noise to wall-clock ratios).

        The 1-minute load at the end counts this run's own threads too (two busy threads read as
        load 2.0 on an otherwise idle host), so their average, ``own_load``, is taken off.
        """
        others = max(self.load_start[0], self.load_end[0] - self.own_load, 0.0)
        own = f", this run's own threads {self.own_load:.1f} more" if self.own_load else ""
        if others >= 0.75 * self.usable_cpus:
            return (f"the host was busy (load {others:.1f} from other processes on {self.usable_cpus} CPUs{own}), "
                    "so they shared the cores and wall-clock ratios carry their noise")
        return f"other processes left the host mostly idle (load {others:.1f} on {self.usable_cpus} CPUs{own})"


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return (float("nan"),) * 3


def _cpu_model() -> tuple[str, int | None, str]:
    """CPU model name, physical core count and vector extensions from /proc/cpuinfo, with portable fallbacks."""
    name, cores, flags = platform.processor() or platform.machine(), set(), set()
    try:
        with open("/proc/cpuinfo") as f:
            physical = "0"
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    name = value
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    cores.add((physical, value))
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, (len(cores) or None), vector_isa(flags)


def vector_isa(flags: set[str]) -> str:
    """The x86 vector extensions among ``/proc/cpuinfo`` flags, in words; empty for other CPUs.

    Example:
        >>> vector_isa({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
        'AVX-512 with VNNI, BF16'
        >>> vector_isa({"avx2"})
        'AVX2, no VNNI'
    """
    extras = [label for flag, label in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_tile", "AMX"))
              if flag in flags]
    if "avx512f" in flags:
        return "AVX-512" + (f" with {', '.join(extras)}" if extras else ", no VNNI")
    if "avx2" in flags:
        return "AVX2" + (" with AVX-VNNI" if "avx_vnni" in flags else ", no VNNI")
    return ""


def describe(device: torch.device) -> Machine:
    """The machine as it is now (call at the start of a run)."""
    cpu, physical, isa = _cpu_model()
    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    machine = Machine(cpu=cpu, physical_cores=physical, logical_cpus=logical, usable_cpus=usable,
                      torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                      load_start=load_average(), vector_isa=isa)
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.gpu = (f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability "
                       f"{props.major}.{props.minor}, {torch.cuda.device_count()} GPU(s) visible")
        machine.gpu_memory_bytes = props.total_memory
        machine.cuda_version = torch.version.cuda
    return machine


def _fmt_load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)

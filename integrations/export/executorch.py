"""ExecuTorch target of ``tsm-surgery export``: the network as a ``.pte`` program, XNNPACK-delegated.

The torch.export'ed program is lowered with ``to_edge_transform_and_lower`` and the XNNPACK
partitioner (every supported op runs in XNNPACK's CPU kernels), then serialised. ExecuTorch
addresses inputs and outputs by position: the sidecar's order is the program's order
(``frames``, then the caches in ``state_names`` order; ``output``, then the new caches).

Example::

    tsm-surgery export --target executorch --model timm:mobilenetv2_100 --online --output mbv2.pte
"""

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn

import tsm_surgery

from .artifacts import offline_example, offline_io, online_example, online_io, require, sidecar_path, torch_export

__all__ = ["export_online", "export_offline", "output_files", "write", "default_sigchld"]


@contextlib.contextmanager
def default_sigchld() -> Iterator[None]:
    """SIGCHLD at its default action while ExecuTorch exports, lowers and serialises (it starts subprocesses).

    A torch ``DataLoader`` with workers installs a Python SIGCHLD handler and never removes it.
    With that handler in place, a process that had run a few dozen other exports died of SIGSEGV
    (``si_code=SI_KERNEL``: the kernel could not deliver the signal) when one of those children
    exited; with the default action the same sequence passes. The caller's handler is put back
    afterwards (it is also a decorator). Off the main thread, or where the handler was not set from
    Python, nothing changes.
    """
    previous = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


@default_sigchld()
def write(module: nn.Module, args: tuple, path: str, input_names: list[str] | None = None,
          output_names: list[str] | None = None) -> None:
    """Lowers ``module`` traced on ``args`` to XNNPACK and writes the ``.pte`` at ``path``.

    ``input_names``/``output_names`` are accepted for a common signature; a ``.pte`` has positions only.
    """
    exir = require("executorch.exir", "executorch")
    xnnpack = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch")
    program = torch_export(module, args)
    lowered = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()])
    with open(path, "wb") as f:
        f.write(lowered.to_executorch().buffer)


def export_online(online: "tsm_surgery.OnlineTSM", path: str, batch_size: int = 1,
                  frame_shape: tuple[int, int, int] = (3, 224, 224)) -> dict[str, Any]:
    """Exports the explicit-state step; returns the sidecar's ``inputs``/``outputs``/``state``."""
    frames, state, out = online_example(online, batch_size, frame_shape)
    io = online_io(frames, state, out)
    write(online.step_module, (frames, *state.values()), path)
    return io


def export_offline(net: "tsm_surgery.TSMNet", path: str, frame_shape: tuple[int, int, int] = (3, 224, 224),
                   clips: int = 1) -> dict[str, Any]:
    """Exports the clip network for ``clips`` clips of ``net.n_segments`` frames (a fixed batch)."""
    x, out = offline_example(net, frame_shape, clips)
    write(net, (x,), path)
    return offline_io(x, out, net.n_segments, dynamic=False)


def output_files(path: str) -> list[tuple[str, str]]:
    """``(path, role)`` of every file an ExecuTorch export writes for program path ``path`` (``*.pte``)."""
    if not path.endswith(".pte"):
        raise ValueError(f"--output {path}: an ExecuTorch program is a .pte file; name it *.pte.")
    return [(path, "the ExecuTorch program (XNNPACK)"),
            (sidecar_path(path), "the JSON sidecar naming inputs, outputs and caches")]

"""Running checks in worker processes: one model at a time per worker, killed and replaced on a
crash or a timeout, so a segfault or a hang costs one row, not the sweep."""

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from .check import Result, check_model
from .specs import ModelSpec

__all__ = ["run_checks"]


def _worker(conn, threads: int, frames: int) -> None:
    import torch

    torch.set_num_threads(threads)
    while True:
        spec = conn.recv()
        if spec is None:
            return
        conn.send(check_model(spec, frames=frames).to_dict())


@dataclass
class _Slot:
    proc: Any
    conn: Any
    task: tuple[int, ModelSpec] | None = None
    since: float = 0.0


class _Pool:
    def __init__(self, jobs: int, threads: int, frames: int):
        self.ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.threads, self.frames = threads, frames
        self.slots: list[_Slot] = [self.start() for _ in range(jobs)]

    def start(self) -> _Slot:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.threads, self.frames), daemon=True)
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot.conn.send(None)
            except OSError:
                pass
            slot.proc.join(timeout=5)
            if slot.proc.is_alive():
                slot.proc.kill()


def _lost(spec: ModelSpec, failed_at: str, reason: str, seconds: float) -> Result:
    return Result(model=spec.candidates[0] if len(spec.candidates) == 1 else spec.label, source=spec.source,
                  family=spec.family, kind=spec.kind, failed_at=failed_at, reason=reason, seconds=round(seconds, 1))


def _collect(pool: _Pool, index: int, ready: list, timeout: float) -> tuple[int, Result] | None:
    """The finished (or lost) task of slot ``index``, replacing a dead or hung worker."""
    slot = pool.slots[index]
    position, spec = slot.task
    elapsed = time.perf_counter() - slot.since
    result = None
    if slot.conn in ready:
        try:
            result = Result.from_dict(slot.conn.recv())
        except (EOFError, OSError):
            result = None
    if result is None and (slot.proc.sentinel in ready or not slot.proc.is_alive()):
        result = _lost(spec, "crash", f"worker died (exit code {slot.proc.exitcode})", elapsed)
        pool.slots[index] = pool.start()
    elif result is None and elapsed > timeout:
        slot.proc.kill()
        slot.proc.join()
        result = _lost(spec, "timeout", f"no result within {timeout:.0f} s", elapsed)
        pool.slots[index] = pool.start()
    if result is None:
        return None
    pool.slots[index].task = None
    return position, result


def run_checks(specs: Sequence[ModelSpec], jobs: int = 1, timeout: float = 180.0, frames: int = 4,
               threads: int | None = None) -> Iterator[tuple[int, Result]]:
    """Checks every spec in worker processes; yields ``(position in specs, result)`` as each finishes.

    Args:
        specs: the models.
        jobs: worker processes.
        timeout: seconds one model may take before its worker is killed (the row says ``timeout``).
        frames: clip length of the checks.
        threads: torch threads per worker (default: the CPU count shared among the workers).
    """
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    pool = _Pool(max(1, jobs), threads, frames)
    todo = list(enumerate(specs))
    pending = len(todo)
    try:
        while pending:
            for slot in pool.slots:
                if slot.task is None and todo:
                    slot.task, slot.since = todo.pop(0), time.perf_counter()
                    slot.conn.send(slot.task[1])
            busy = [s for s in pool.slots if s.task is not None]
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=1.0)
            for index, slot in enumerate(pool.slots):
                done = _collect(pool, index, ready, timeout) if slot.task is not None else None
                if done is not None:
                    pending -= 1
                    yield done
    finally:
        pool.close()

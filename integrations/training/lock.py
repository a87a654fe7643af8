"""An exclusive lock on a training work dir, held for the whole run.

Two ``tsm-surgery train`` runs into one work dir would replace each other's checkpoints and share
log files. :func:`work_dir_lock` takes an OS file lock (``fcntl.flock``) on ``<work_dir>/.tsm-surgery.lock``;
the operating system releases it when the process ends, however it ends (a kill included), so a
stale lock file never blocks a later run. A second run stops at once, naming the holder's PID.

Example:
    >>> with work_dir_lock("/tmp/tsm_lock_example"):
    ...     pass  # train here
"""

import contextlib
import os
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None

__all__ = ["work_dir_lock", "WorkDirLockedError", "LOCK_NAME"]

LOCK_NAME = ".tsm-surgery.lock"


class WorkDirLockedError(OSError):
    """Another process holds the work dir."""


@contextlib.contextmanager
def work_dir_lock(work_dir: str) -> Iterator[None]:
    """Holds an exclusive, non-blocking lock on ``work_dir`` (created if missing) for the block.

    Raises:
        WorkDirLockedError: another live process holds it; the message names its PID.
    """
    if fcntl is None:
        yield
        return
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise WorkDirLockedError(
                f"work dir {work_dir!r} is in use by another training run (PID {holder}, lock file {path}). "
                "Wait for it to finish, stop it, or choose another --work-dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock

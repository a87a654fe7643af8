"""Output files of the writing verbs: never overwrite without ``--force``, never collide, never half-written.

:func:`claim_outputs` checks a set of output paths before anything slow runs; :func:`atomic_outputs`
writes them: the body writes temporary paths in the targets' own directories, and only when it
completes are they renamed over the targets, all of them together. A failure or Ctrl-C leaves
the old outputs as they were and no temporary file behind.

Example:
    >>> with atomic_outputs([("/tmp/new_model.json", "the sidecar")], force=True) as (tmp,):
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("{}")
    >>> open("/tmp/new_model.json").read()
    '{}'
"""

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

__all__ = ["claim_outputs", "atomic_outputs", "atomic_file", "set_aside_outputs", "OutputWriteError", "write_error"]

STAGING_PREFIX = ".tsm-surgery-tmp-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# torch.save's C++ writer reports a failed write without errno: "[enforce fail at inline_container.cc:...]
# . unexpected pos ..." or "PytorchStreamWriter failed writing file ...".
_TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter", "file write failed", "unexpected pos")


class OutputWriteError(OSError):
    """An output could not be written; ``str()`` is one line naming the file and the cause."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


def _names(outputs: Sequence[tuple[str, str]]) -> str:
    items = [f"{path} ({role})" for path, role in outputs]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def claim_outputs(outputs: Sequence[tuple[str, str]], force: bool, *,
                  hint: str = "choose another output path", folders: bool = False) -> list[str]:
    """Checks the files a command will write before it writes any; returns their paths.

    Nothing is removed: with ``force`` the existing files are replaced when the new ones are
    complete (:func:`atomic_outputs`).

    Args:
        outputs: ``(path, role)`` for every file the command writes, e.g.
            ``("x.onnx", "the ONNX graph")``; the message names them all.
        force: existing files may be replaced.
        hint: the alternative to ``--force``, for the message.
        folders: outputs may be folders (a generated dataset's ``videos/``).

    Raises:
        ValueError: two outputs have the same path (one would overwrite the other).
        FileExistsError: some exist and ``force`` is false; nothing is written.
        IsADirectoryError: an output path is a directory (and ``folders`` is false).
    """
    seen: dict[str, str] = {}
    for path, role in outputs:
        key = os.path.abspath(os.path.expanduser(path))
        if key in seen:
            raise ValueError(f"{path} would be written twice, as {seen[key]} and as {role}: one would overwrite "
                             f"the other; {hint}.")
        seen[key] = role
    existing = [path for path, _ in outputs if os.path.lexists(path)]
    together = " These files belong together." if len(outputs) > 1 else ""
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise FileExistsError(f"{', '.join(existing)} already {verb}; refusing to overwrite. This command writes "
                              f"{_names(outputs)}.{together} Pass --force to replace them, or {hint}.")
    for path in [] if folders else existing:
        if os.path.isdir(path) and not os.path.islink(path):
            raise IsADirectoryError(f"{path} is a directory; the output must be a file path.")
    return [path for path, _ in outputs]


def write_error(path: str, err: BaseException) -> OutputWriteError | None:
    """One line naming ``path`` and the cause of a failed write, or ``None`` if ``err`` is no write failure.

    A full disk (``ENOSPC``, a quota, or torch.save's writer failing with the disk nearly full)
    reads "no space left on device".
    """
    if isinstance(err, OutputWriteError):
        return err
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code in _DISK_FULL:
        return OutputWriteError(f"cannot write {path}: no space left on device ({os.strerror(code)}); free some "
                                "space or write elsewhere. Nothing was replaced.", code)
    if isinstance(err, RuntimeError) and any(mark in str(err) for mark in _TORCH_WRITER):
        if _nearly_full(os.path.dirname(os.path.abspath(path))):
            return OutputWriteError(f"cannot write {path}: no space left on device (torch.save's writer failed "
                                    "with the disk full); free some space or write elsewhere. Nothing was "
                                    "replaced.", errno.ENOSPC)
        first = " ".join(str(err).split())[:200]
        return OutputWriteError(f"cannot write {path}: torch.save's writer failed ({first}). Nothing was replaced.")
    filename = str(getattr(err, "filename", None) or "")
    if isinstance(err, OSError) and code is not None and STAGING_PREFIX in filename:
        return OutputWriteError(f"cannot write {path}: {os.strerror(code)}. Nothing was replaced.", code)
    return None


def _nearly_full(directory: str) -> bool:
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


class _Staging:
    """Temporary paths for a set of targets: one hidden folder per target directory, same basenames.

    Same basenames matter: the ONNX exporter writes ``x.onnx.data`` beside ``x.onnx`` and names it
    inside the graph, so the pair must keep its names when it moves.
    """

    def __init__(self, targets: Sequence[str]):
        self.targets = [os.path.abspath(os.path.expanduser(t)) for t in targets]
        self.folders: dict[str, str] = {}
        try:
            for target in self.targets:
                parent = os.path.dirname(target)
                if parent not in self.folders:
                    os.makedirs(parent, exist_ok=True)
                    self.folders[parent] = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent)
        except BaseException:
            self.discard()
            raise
        self.temps = [os.path.join(self.folders[os.path.dirname(t)], os.path.basename(t)) for t in self.targets]

    def discard(self) -> None:
        for folder in self.folders.values():
            shutil.rmtree(folder, ignore_errors=True)

    def newest_target(self) -> str:
        written = [(os.path.getmtime(tmp), target) for tmp, target in zip(self.temps, self.targets)
                   if os.path.lexists(tmp)]
        return max(written)[1] if written else ", ".join(self.targets)

    def commit(self, keep_unwritten: bool = False) -> None:
        """Moves the old targets aside, the new files in, then drops the old ones; undoes all on a failure.

        A target the body did not write is removed too, so no stale member of the set survives
        (unless ``keep_unwritten``).
        """
        moved: list[tuple[str, str]] = []  # (backup, target): old files set aside
        placed: list[str] = []
        try:
            for tmp, target in zip(self.temps, self.targets):
                if keep_unwritten and not os.path.lexists(tmp):
                    continue
                if os.path.lexists(target):
                    backup = os.path.join(os.path.dirname(tmp), ".old-" + os.path.basename(target))
                    os.replace(target, backup)
                    moved.append((backup, target))
                if os.path.lexists(tmp):
                    os.replace(tmp, target)
                    placed.append(target)
        except BaseException:
            for target in placed:
                with contextlib.suppress(OSError):
                    os.remove(target) if not os.path.isdir(target) else shutil.rmtree(target)
            for backup, target in moved:
                with contextlib.suppress(OSError):
                    os.replace(backup, target)
            raise
        finally:
            self.discard()


@contextlib.contextmanager
def atomic_outputs(outputs: Sequence[tuple[str, str]], force: bool, *, hint: str = "choose another output path",
                   folders: bool = False, keep_unwritten: bool = False) -> Iterator[list[str]]:
    """Yields temporary paths for ``outputs``; renames them over the targets when the body completes.

    The checks are :func:`claim_outputs`'s. The temporary paths lie in hidden folders in the
    targets' own directories (same file system, so the renames are atomic) and keep the targets'
    basenames. When the body completes, every target is replaced by what the body wrote at its
    temporary path (files or folders), and a target the body did not write is removed: the set
    is replaced together. When the body raises (Ctrl-C included) the temporary files are removed
    and the targets are untouched; a write failure is re-raised as one line naming the file and
    the cause (:func:`write_error`).

    Args:
        outputs: ``(path, role)`` for every output.
        force: existing targets may be replaced.
        hint: the alternative to ``--force``, for the message.
        folders: outputs may be folders.
        keep_unwritten: leave a target alone when the body wrote nothing at its temporary path.

    Raises:
        FileExistsError, ValueError, IsADirectoryError: see :func:`claim_outputs`.
        OutputWriteError: a write failed (disk full, permissions...); nothing was replaced.
    """
    claim_outputs(outputs, force, hint=hint, folders=folders)
    try:
        staging = _Staging([path for path, _ in outputs])
    except OSError as err:  # e.g. a read-only directory: name the output, not the temporary folder
        raise (write_error(", ".join(p for p, _ in outputs), err) or err) from err
    try:
        yield list(staging.temps)
    except BaseException as err:
        failed = write_error(staging.newest_target(), err) if isinstance(err, Exception) else None
        staging.discard()
        if failed is not None and failed is not err:
            raise failed from err
        raise
    try:
        staging.commit(keep_unwritten)
    except OSError as err:
        raise (write_error(", ".join(p for p, _ in outputs), err) or err) from err


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` renamed over it when the body completes (no ``--force`` check).

    For files a library writes repeatedly, such as training checkpoints: a reader sees the old
    file or the complete new one, never a truncated one. A body that writes nothing leaves ``path`` alone.
    """
    with atomic_outputs([(path, "the file")], force=True, keep_unwritten=True) as (tmp,):
        yield tmp


@contextlib.contextmanager
def set_aside_outputs(outputs: Sequence[tuple[str, str]], force: bool, *,
                      hint: str = "choose another output path") -> Iterator[list[str]]:
    """Moves existing outputs aside, yields the real paths; puts the old ones back when the body fails.

    For outputs that must be written in place because they record their own paths (a training
    run's work dirs and their dumped configs). When the body completes, the old outputs are
    deleted; when it raises (Ctrl-C included), what it wrote at those paths is removed and the
    old outputs return. Files or folders.

    Raises:
        FileExistsError, ValueError: see :func:`claim_outputs`.
    """
    paths = claim_outputs(outputs, force, hint=hint, folders=True)
    existing = [p for p in paths if os.path.lexists(p)]
    staging = _Staging(existing) if existing else None
    moved: list[tuple[str, str]] = []
    try:
        for path, backup in zip(existing, staging.temps if staging else []):
            os.replace(path, backup)
            moved.append((backup, path))
        yield paths
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        for backup, path in moved:
            with contextlib.suppress(OSError):
                os.replace(backup, path)
        raise
    finally:
        if staging is not None:
            staging.discard()

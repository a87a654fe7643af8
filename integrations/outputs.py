"""Output files of the writing verbs: never overwrite without ``--force``, never collide.

Example:
    >>> claim_outputs([("/tmp/new_model.onnx", "the ONNX graph"), ("/tmp/new_model.json", "its sidecar")],
    ...               force=True)
    ['/tmp/new_model.onnx', '/tmp/new_model.json']
"""

import os
from collections.abc import Sequence

__all__ = ["claim_outputs"]


def _names(outputs: Sequence[tuple[str, str]]) -> str:
    items = [f"{path} ({role})" for path, role in outputs]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def claim_outputs(outputs: Sequence[tuple[str, str]], force: bool, *,
                  hint: str = "choose another output path") -> list[str]:
    """Checks the files a command will write before it writes any; returns their paths.

    Args:
        outputs: ``(path, role)`` for every file the command writes, e.g.
            ``("x.onnx", "the ONNX graph")``; the message names them all.
        force: replace existing files. They are removed now, so no stale member of the set
            (such as an old ``.onnx.data``) survives next to the new files.
        hint: the alternative to ``--force``, for the message.

    Raises:
        ValueError: two outputs have the same path (one would overwrite the other).
        FileExistsError: some exist and ``force`` is false; nothing is written.
    """
    seen = {}
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
    for path in existing:
        if os.path.isdir(path) and not os.path.islink(path):
            raise IsADirectoryError(f"{path} is a directory; the output must be a file path.")
        os.remove(path)
    return [path for path, _ in outputs]

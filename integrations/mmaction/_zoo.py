"""Stock ``pretrained`` names as local files, so every 2D checkpoint is read weights-only.

MMAction2 resolves ``torchvision://``, ``mmcls://`` and ``open-mmlab://`` names and URLs through
mmengine, which unpickles downloaded files in full. Here the same names resolve to the same
cached file, and the file is then read through the local loader (``weights_only=True``).
"""

import contextlib
import os
from collections.abc import Iterator
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = ["resolve_pretrained", "local_pretrained"]


def resolve_pretrained(name: str) -> tuple[str, str | None]:
    """A local file for a stock ``pretrained`` name, and the key prefix its weights sit under.

    ``torchvision://``, ``mmcls://`` and ``open-mmlab://`` names go through mmengine's model-zoo
    tables to a URL, as MMAction2 resolves them; a URL is fetched into torch hub's checkpoint
    cache (``$TORCH_HOME/hub/checkpoints``) only when that file is missing, as MMAction2 does.
    The file is then read with ``weights_only=True``, unlike MMAction2's loader. A path stays as it is.

    Example:
        >>> resolve_pretrained('work_dirs/tsm_r50/epoch_50.pth')   # a path stays a path
        ('work_dirs/tsm_r50/epoch_50.pth', None)
    """
    from mmengine.runner import checkpoint as zoo

    scheme, _, model = name.partition("://")
    tables = {"torchvision": zoo.get_torchvision_models, "mmcls": zoo.get_mmcls_models,
              "open-mmlab": zoo.get_external_models, "openmmlab": zoo.get_external_models}
    if scheme in tables:
        urls = tables[scheme]()
        if model not in urls:
            raise KeyError(f"pretrained={name!r}: mmengine knows no {scheme} model {model!r}.")
        url = urls[model]
    elif scheme in ("http", "https"):
        url = name
    else:
        return os.path.expanduser(name), None
    if not url.startswith(("http://", "https://")):  # open-mmlab entries may name another scheme or a path
        return resolve_pretrained(url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path)
    # mmcls checkpoints are classifiers; MMAction2 keeps their 'backbone.' weights.
    return path, "backbone." if scheme == "mmcls" else None


def _remote(name) -> bool:
    # mmcls:// stays with mmengine here: it also strips the classifier's 'backbone.' prefix.
    return isinstance(name, str) and "://" in name and not name.startswith("mmcls://")


@contextlib.contextmanager
def local_pretrained(model: nn.Module) -> Iterator[None]:
    """While ``model`` runs its own ``init_weights``, its remote ``pretrained`` / ``init_cfg``
    checkpoint names point at the local files :func:`resolve_pretrained` gives."""
    restore = []
    if _remote(getattr(model, "pretrained", None)):
        restore.append((model.__dict__, "pretrained", model.pretrained))
        model.pretrained = resolve_pretrained(model.pretrained)[0]
    cfgs = getattr(model, "init_cfg", None)
    for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained" and _remote(cfg.get("checkpoint")):
            restore.append((cfg, "checkpoint", cfg["checkpoint"]))
            cfg["checkpoint"] = resolve_pretrained(cfg["checkpoint"])[0]
    try:
        yield
    finally:
        for owner, key, value in restore:
            owner[key] = value

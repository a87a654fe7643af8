"""Makes mmaction2 1.2.0 importable and usable on this stack; applied once on import.

Each patch has a one-line reason and a test in tests/test_mmaction_compat.py that fails
without it. ``apply()`` is idempotent; importing ``tsm_surgery.integrations.mmaction`` calls it.
"""

import importlib.util
import os
import sys
import types

_applied = False


def _placeholder_drn() -> None:
    # The 1.2.0 wheel lacks mmaction/models/localizers/drn/ (upstream issue #2714), so
    # `import mmaction.models` fails; DRN is a temporal-grounding localizer we never use.
    if "mmaction.models.localizers.drn.drn" in sys.modules:
        return
    package = types.ModuleType("mmaction.models.localizers.drn")
    package.__path__ = []
    module = types.ModuleType("mmaction.models.localizers.drn.drn")

    class DRN:
        """Placeholder for the DRN localizer missing from the mmaction2 1.2.0 wheel."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("DRN is missing from the mmaction2 1.2.0 wheel (upstream #2714).")

    module.DRN = DRN
    package.drn = module
    sys.modules[package.__name__] = package
    sys.modules[module.__name__] = module


def _is_installed(package: str) -> bool:
    """mmengine's is_installed without pkg_resources."""
    from importlib import metadata

    try:
        metadata.distribution(package)
        return True
    except metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.origin is not None


def _get_installed_path(package: str) -> str:
    """mmengine's get_installed_path without pkg_resources (module dir of the package)."""
    from importlib import metadata

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        try:
            top = (metadata.distribution(package).read_text("top_level.txt") or "").split()
        except metadata.PackageNotFoundError:
            top = []
        spec = importlib.util.find_spec(top[0]) if top else None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (needed by a '{package}::' config path).")
    return os.path.dirname(spec.origin)


def _no_pkg_resources() -> None:
    # mmengine resolves `mmaction::` config paths with pkg_resources, which setuptools >= 82
    # removed (and which re-imports itself on every call, slowly): use importlib instead.
    import mmengine.utils as utils
    from mmengine.config import config as config_module
    from mmengine.utils import package_utils

    for module in (package_utils, config_module, utils):
        if hasattr(module, "is_installed"):
            module.is_installed = _is_installed
        if hasattr(module, "get_installed_path"):
            module.get_installed_path = _get_installed_path


def _weights_only_checkpoints() -> None:
    # torch >= 2.6 loads weights_only=True by default and mmengine's checkpoints hold its message
    # hub, so load_from fails; load them safely with an exact allowlist (see checkpoint.py).
    from mmengine.runner.checkpoint import CheckpointLoader

    from .checkpoint import load_checkpoint_file

    CheckpointLoader.register_scheme(prefixes="", loader=load_checkpoint_file, force=True)


def _trusted_resume() -> None:
    # Resuming full training state may unpickle more than weights: allowed for the one file being
    # resumed, only when the run opted in (config key trusted_resume=True, set by
    # `tsm-surgery train --resume`, or TSM_SURGERY_TRUSTED_RESUME=1). Nothing else reads the opt-in.
    from mmengine.runner import Runner

    from .checkpoint import TRUST_ENV, trusted_resume

    original = Runner.resume
    if getattr(original, "_tsm_surgery", False):
        return

    def resume(self, filename, *args, **kwargs):
        opted_in = bool(self.cfg.get("trusted_resume", False)) or os.environ.get(TRUST_ENV, "") == "1"
        with trusted_resume(filename if opted_in else None):
            return original(self, filename, *args, **kwargs)

    resume._tsm_surgery = True
    resume._original = original
    resume.__doc__ = original.__doc__
    Runner.resume = resume


def _cpu_distributed() -> None:
    # mmengine's torchrun launcher calls torch.cuda.set_device unconditionally, so DDP on CPU
    # (gloo) fails on a machine without a GPU; skip it there.
    from mmengine.dist import utils as dist_utils

    original = dist_utils._init_dist_pytorch
    if getattr(original, "_tsm_surgery", False):
        return

    def init_dist_pytorch(backend, init_backend="torch", **kwargs):
        import torch

        if torch.cuda.is_available() or init_backend != "torch":
            return original(backend, init_backend=init_backend, **kwargs)
        if backend == "nccl":
            backend = "gloo"  # nccl needs CUDA
        torch.distributed.init_process_group(backend=backend, **kwargs)

    init_dist_pytorch._tsm_surgery = True
    init_dist_pytorch._original = original
    dist_utils._init_dist_pytorch = init_dist_pytorch


PATCHES = (_placeholder_drn, _no_pkg_resources, _weights_only_checkpoints, _trusted_resume, _cpu_distributed)


def apply() -> None:
    """Applies every patch once; safe to call repeatedly."""
    global _applied
    if _applied:
        return
    for patch in PATCHES:
        patch()
    _applied = True

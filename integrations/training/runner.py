"""Train and test MMAction2 configs with mmengine's Runner: ``tsm-surgery train`` / ``test``.

Python API::

    from .runner import train, test
    runner = train('configs/demo/tsm_r18w32_1x1x8_demo.py', work_dir='work_dirs/tsm')
    top1 = runner.message_hub.get_scalar('val/acc/top1').current()
    metrics = test('configs/demo/tsm_r18w32_1x1x8_demo.py', 'work_dirs/tsm/epoch_12.pth')

One machine runs them directly. Several processes (GPUs or CPU workers) run the same command
under ``torchrun`` with ``--launcher pytorch``, mmengine's DistributedDataParallel::

    torchrun --nproc_per_node 2 -m tsm_surgery.cli train CONFIG --launcher pytorch

Without CUDA the process group uses gloo and DDP runs on CPU; with CUDA, nothing changes.

Checkpoints: ``load_from`` (and the CHECKPOINT of ``test``) loads with ``weights_only=True``.
``--resume`` resumes full training state (model, optimizer, schedulers, message hub) and is the
explicit opt-in for unpickling the one checkpoint it resumes in full when the safe loader cannot
read it: use it only for files you trust, such as your own work dir's (see :mod:`.checkpoint`).

A work dir that already holds checkpoints is never trained over unless asked: pass
``--resume`` to continue it or ``--overwrite`` to start again.
"""

import contextlib
import copy
import glob
import logging
import os
import os.path as osp
import zipfile
from collections.abc import Sequence
from typing import Any

import torch

from tsm_surgery.integrations.mmaction import compat

compat.apply()

from mmaction.registry import HOOKS, MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dist import is_main_process  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.model import is_model_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.runner.checkpoint import find_latest_checkpoint  # noqa: E402

import tsm_surgery.integrations.mmaction  # noqa: E402,F401  (registers the plugin)
from tsm_surgery.integrations.checkpoints import layout_adapter  # noqa: E402
from tsm_surgery.integrations.checkpoints.loading import (  # noqa: E402
    Adapter,
    CheckpointLoadError,
    match_state_dict,
    state_dict_of,
)
from tsm_surgery.integrations.mmaction.backbone import print_log_level  # noqa: E402
from tsm_surgery.integrations.mmaction.clip_length import sync_clip_length  # noqa: E402
from tsm_surgery.integrations.outputs import atomic_file  # noqa: E402

from .lock import work_dir_lock  # noqa: E402
from .random_state import RandomStateHook  # noqa: E402

__all__ = ["load_config", "build_runner", "train", "test", "CheckpointKeysHook"]

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")
ConfigLike = str | Config


@HOOKS.register_module()
class CheckpointKeysHook(Hook):
    """Stops on a checkpoint whose keys do not match the model, naming the file.

    mmengine loads ``load_from`` with ``strict=False`` and only logs missing keys, so a
    checkpoint of another model "loads" and evaluates at chance. The check is
    :func:`~tsm_surgery.integrations.checkpoints.loading.match_state_dict`, the one every loader uses.

    Args:
        strict: every model key must be in the checkpoint with the same shape, and the
            checkpoint must have no other keys (for testing). Otherwise the backbone's keys
            must all be there (fine-tuning may replace the head).
        source: how the user named the file, for the message (e.g. ``'load_from'``).
        adapt: a key-layout adapter, ``adapt(state, model_state) -> state``; the adapted
            state_dict is what mmengine then loads. By default MMAction2 ``ResNetTSM``/
            ``MobileNetV2TSM``/``MobileOneTSM``/TPN and paper-repo TSM checkpoints are imported
            (:func:`~tsm_surgery.integrations.checkpoints.layout_adapter`), the source logged.
    """

    priority = "VERY_HIGH"

    def __init__(self, strict: bool = False, source: str = "load_from", adapt: Adapter | None = None) -> None:
        self.strict = strict
        self.source = source
        self.adapt = adapt

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        path = runner._load_from
        state = state_dict_of(checkpoint, path, self.source)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        own = model.state_dict()
        required = None
        if not self.strict and any(k.startswith("backbone.") for k in own):
            required = lambda key: key.startswith("backbone.")  # noqa: E731
        adapt = self.adapt or layout_adapter(model, f"{self.source}={path!r}", log=print_log_level,
                                             strict=self.strict)
        adapted = match_state_dict(state, own, path=path, source=self.source, required=required,
                                   allow_unexpected=not self.strict, adapt=adapt)
        if adapted is not state:  # another layout, imported: mmengine loads the adapted keys
            if isinstance(checkpoint.get("state_dict"), dict):
                checkpoint["state_dict"] = adapted
            else:
                checkpoint.clear()
                checkpoint.update(adapted)


def _set_options(cfg: Config, cfg_options: dict[str, Any] | None) -> None:
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))


def _required_files(cfg: Config, splits: Sequence[str]) -> None:
    for split in splits:
        loader = cfg.get(f"{split}_dataloader")
        if not loader:
            continue
        dataset = loader.get("dataset", {})
        while "dataset" in dataset and "ann_file" not in dataset:
            dataset = dataset["dataset"]
        ann = dataset.get("ann_file")
        if ann and not osp.isfile(ann):
            raise FileNotFoundError(f"{split}_dataloader.dataset.ann_file={ann!r} does not exist. Hint: generate "
                                    "the demo data with `tsm-surgery synth-data DIR`, or set the path with "
                                    f"--cfg-options {split}_dataloader.dataset.ann_file=...")
        prefix = (dataset.get("data_prefix") or {}).get("video")
        if prefix and not osp.isdir(prefix):
            raise FileNotFoundError(f"{split}_dataloader.dataset.data_prefix.video={prefix!r} is not a directory.")


def _check_model_types(cfg: Config) -> None:
    model = cfg.get("model")
    if not model:
        raise KeyError("the config has no `model`.")
    backbone = model.get("backbone")
    if isinstance(backbone, dict):
        kind = backbone.get("type")
        known = isinstance(kind, str) and (kind.startswith(("timm.", "torchvision.", "mmcls.", "mmpretrain."))
                                           or MODELS.get(kind) is not None)
        if isinstance(kind, str) and not known:
            raise KeyError(
                f"model.backbone.type={kind!r} is not a registered model. Hint: 'TSMSurgeryBackbone' needs "
                "custom_imports=dict(imports=['tsm_surgery.integrations.mmaction']); MMAction2's own types are "
                "'ResNetTSM', 'ResNet', ...; other libraries' models are 'timm.<name>' or 'torchvision.<name>'.")


def load_config(config: ConfigLike, work_dir: str | None = None, cfg_options: dict[str, Any] | None = None,
                launcher: str = "none") -> Config:
    """Reads a config and prepares it for this machine.

    Applies ``cfg_options``, sets ``work_dir`` (default ``work_dirs/<config name>``), sets the
    backbone's and head's ``num_segments`` from the pipeline, adds :class:`ClipLengthHook`
    when missing, and without CUDA selects gloo and CPU-style DDP.

    Args:
        config: a config path or ``Config``.
        work_dir: where logs and checkpoints go.
        cfg_options: ``{'dotted.key': value}`` overrides.
        launcher: ``'none'``, ``'pytorch'`` (torchrun), ``'slurm'`` or ``'mpi'``.

    Returns:
        The prepared ``Config`` (a copy when a ``Config`` was given).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} is not one of {LAUNCHERS}.")
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    else:
        if not osp.isfile(config):
            raise FileNotFoundError(f"config file {config!r} does not exist.")
        cfg = Config.fromfile(config)
    _set_options(cfg, cfg_options)
    init_default_scope(cfg.get("default_scope", "mmaction"))
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        name = osp.splitext(osp.basename(cfg.filename or "config"))[0]
        cfg.work_dir = osp.join("work_dirs", name)
    cfg.launcher = launcher
    _check_model_types(cfg)
    sync_clip_length(cfg)
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(isinstance(h, dict) and h.get("type") in ("ClipLengthHook",) for h in hooks):
        hooks.append(dict(type="ClipLengthHook"))
    cfg.custom_hooks = hooks
    if not torch.cuda.is_available():
        env = cfg.setdefault("env_cfg", {})
        env.setdefault("dist_cfg", {})["backend"] = "gloo"  # nccl needs CUDA
        if launcher != "none":
            # CPU modules take no device_ids in DistributedDataParallel.
            default = dict(type="MMDistributedDataParallel", broadcast_buffers=False)
            wrapper = dict(cfg.get("model_wrapper_cfg") or default)
            wrapper["device_ids"] = None
            cfg.model_wrapper_cfg = wrapper
    return cfg


def _existing_checkpoints(work_dir: str) -> list[str]:
    found = sorted(glob.glob(osp.join(work_dir, "*.pth")))
    if osp.isfile(osp.join(work_dir, "last_checkpoint")):
        found.append(osp.join(work_dir, "last_checkpoint"))
    return found


def _resume_target(cfg: Config, resume: bool | str) -> str | None:
    """The one checkpoint to resume: a path, the work dir's last checkpoint, or None (start fresh).

    ``resume=True`` (or the config's ``resume=True``) continues the work dir's last checkpoint;
    when there is none and ``load_from`` is set, training starts from those weights
    (``weights_only=True``): ``load_from`` is never resumed, so never unpickled in full.
    """
    if isinstance(resume, str):
        return resume
    if not (resume or cfg.get("resume", False)):
        return None
    latest = find_latest_checkpoint(cfg.work_dir) if osp.isfile(osp.join(cfg.work_dir, "last_checkpoint")) else None
    load_from = cfg.get("load_from")
    if latest:
        if load_from:
            print_log(f"--resume: resuming {latest}; load_from={load_from!r} is not used.", logger="current",
                      level=logging.WARNING)
        return latest
    if load_from:
        print_log(f"--resume: work dir {cfg.work_dir!r} has no last_checkpoint; starting from the weights of "
                  f"load_from={load_from!r} (weights_only=True).", logger="current", level=logging.WARNING)
        return None
    found = sorted(glob.glob(osp.join(cfg.work_dir, "*.pth")))
    if found:  # a run stopped before its first complete checkpoint, or files copied in: no bare --resume
        raise FileNotFoundError(f"--resume: work dir {cfg.work_dir!r} has no last_checkpoint (it holds "
                                f"{', '.join(osp.basename(f) for f in found[:3])}); resume one of them with "
                                f"--resume {found[-1]}, or start again with --overwrite.")
    raise FileNotFoundError(f"--resume: work dir {cfg.work_dir!r} has no last_checkpoint to resume from; "
                            "pass the checkpoint path (--resume PATH) or train without --resume.")


def _check_resumable(path: str, work_dir: str) -> None:
    """A truncated checkpoint (an interrupted save before saves were atomic) stops with the way out named."""
    if "://" in path or not osp.isfile(path) or not _is_zip_start(path) or zipfile.is_zipfile(path):
        return  # torch.save's zip archives end with their directory: a cut one has none
    others = [f for f in sorted(glob.glob(osp.join(work_dir, "*.pth"))) if osp.abspath(f) != osp.abspath(path)]
    earlier = f"resume an earlier one (--resume {others[-1]}), or " if others else ""
    raise CheckpointLoadError(f"--resume {path}: the checkpoint is truncated or damaged (an interrupted save); "
                              f"{earlier}start again with --overwrite.", path)


def _is_zip_start(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def _save_atomically(runner: Runner) -> None:
    """Makes ``runner.save_checkpoint`` write a temporary file and rename it over ``epoch_N.pth`` when complete.

    mmengine writes checkpoints in place, so a kill or a full disk mid-write leaves a truncated
    ``epoch_N.pth`` that ``--resume`` or ``test`` later trips over. Remote back ends keep mmengine's own write.
    """
    save = runner.save_checkpoint

    def save_checkpoint(out_dir: str, filename: str, *args, **kwargs) -> None:
        if "://" in str(out_dir) or not is_main_process():  # other ranks save nothing (master_only)
            return save(out_dir, filename, *args, **kwargs)
        with atomic_file(osp.join(out_dir, filename)) as tmp:
            save(osp.dirname(tmp), osp.basename(tmp), *args, **kwargs)

    runner.save_checkpoint = save_checkpoint


def build_runner(cfg: Config, checkpoint_keys: CheckpointKeysHook | None = None) -> Runner:
    """``Runner.from_cfg`` plus the checkpoint key check; checkpoints are written atomically."""
    runner = Runner.from_cfg(cfg)
    runner.register_hook(checkpoint_keys or CheckpointKeysHook(strict=False))
    runner.register_hook(RandomStateHook())
    _save_atomically(runner)
    return runner


def train(config: ConfigLike, work_dir: str | None = None, cfg_options: dict[str, Any] | None = None,
          launcher: str = "none", resume: bool | str = False, load_from: str | None = None,
          overwrite: bool = False) -> Runner:
    """Trains (and validates) a config with mmengine's Runner.

    Args:
        config: a config path or ``Config``.
        work_dir: where logs and checkpoints go (default ``work_dirs/<config name>``).
        cfg_options: ``{'dotted.key': value}`` overrides, e.g. ``{'train_cfg.max_epochs': 1}``.
        launcher: ``'none'`` for one process, ``'pytorch'`` under torchrun, ``'slurm'``, ``'mpi'``.
        resume: ``True`` continues the work dir's last checkpoint (when there is none, training
            starts from ``load_from``'s weights); a path continues that file. Resuming is the
            opt-in for unpickling that one checkpoint in full, if it holds more than weights.
        load_from: initial weights (``weights_only=True``, never unpickled in full); ``None``
            keeps the config's. Not combined with ``resume=PATH``.
        overwrite: train in a work dir that already holds checkpoints without resuming.

    Returns:
        The Runner after training. The last validation metrics are in
        ``runner.message_hub.get_scalar('val/acc/top1').current()`` (and ``'val/acc/mean1'``...);
        ``runner.model`` holds the trained model.

    Raises:
        FileExistsError: the work dir holds checkpoints and neither ``resume`` nor ``overwrite``.
        WorkDirLockedError: another run holds the work dir (its PID is named); the lock is held
            for the whole run and released however the process ends.
        FileNotFoundError: the config, an annotation file, a video folder or a checkpoint is missing.
        KeyError: an unknown model type or a checkpoint whose keys do not match.
    """
    if isinstance(resume, str) and load_from is not None:
        raise ValueError(f"--resume {resume} and --load-from {load_from} both name a checkpoint: resume one file "
                         "(--resume PATH) or start from weights (--load-from PATH).")
    cfg = load_config(config, work_dir, cfg_options, launcher)
    _required_files(cfg, ("train", "val") if cfg.get("val_cfg") else ("train",))  # before the work dir is made
    # One run per work dir, for the whole run (rank 0 holds it under DDP; the ranks share the dir).
    with work_dir_lock(cfg.work_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        return _train(cfg, resume, load_from, overwrite)


def _train(cfg: Config, resume: bool | str, load_from: str | None, overwrite: bool) -> Runner:
    if load_from is not None:
        cfg.load_from = load_from
    resume_from = _resume_target(cfg, resume)
    cfg.resume = resume_from is not None
    if cfg.resume:
        _check_resumable(resume_from, cfg.work_dir)
        cfg.load_from = resume_from
        # The explicit opt-in covers this one file: Runner.resume is only ever given it.
        cfg.trusted_resume = bool(resume) or bool(cfg.get("trusted_resume", False))
    existing = _existing_checkpoints(cfg.work_dir)
    if existing and not cfg.resume and not overwrite:
        resumable = osp.isfile(osp.join(cfg.work_dir, "last_checkpoint"))
        how = "--resume" if resumable else f"--resume {existing[-1]} (there is no last_checkpoint)"
        raise FileExistsError(
            f"work dir {cfg.work_dir!r} already holds a training run ({osp.basename(existing[0])}, ...). "
            f"Pass {how} to continue it, --overwrite to train over it, or choose another --work-dir.")
    if cfg.get("load_from") and not osp.isfile(cfg.load_from) and "://" not in cfg.load_from:
        raise FileNotFoundError(f"{'--resume' if cfg.resume else 'load_from'}={cfg.load_from!r} does not exist.")
    runner = build_runner(cfg, CheckpointKeysHook(strict=False, source="load_from"))
    runner.train()
    return runner


def test(config: ConfigLike, checkpoint: str, work_dir: str | None = None,
         cfg_options: dict[str, Any] | None = None, launcher: str = "none") -> dict[str, float]:
    """Evaluates a checkpoint on the config's test set with mmengine's Runner.

    The checkpoint is loaded with ``weights_only=True`` and must match the model exactly.

    Args:
        config: a config path or ``Config``.
        checkpoint: the weights to evaluate.
        work_dir: where the test log goes (default ``work_dirs/<config name>``); nothing
            there is overwritten (each run logs into its own timestamped folder).
        cfg_options: ``{'dotted.key': value}`` overrides.
        launcher: as for :func:`train`.

    Returns:
        The test metrics, e.g. ``{'acc/top1': 0.83, 'acc/top5': 1.0, 'acc/mean1': 0.83}``.
    """
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f"CHECKPOINT {checkpoint!r} does not exist.")
    cfg = load_config(config, work_dir, cfg_options, launcher)
    sync_clip_length(cfg, split="test")
    cfg.load_from = checkpoint
    cfg.resume = False
    _required_files(cfg, ("test",))
    runner = build_runner(cfg, CheckpointKeysHook(strict=True, source="CHECKPOINT"))
    return dict(runner.test())

"""Train and test MMAction2 configs with mmengine's Runner: ``tsm-surgery train`` / ``test``.

Python API::

    from tsm_surgery.integrations.mmaction.runner import train, test
    runner = train('configs/demo/tsm_r18w32_1x1x8_demo.py', work_dir='work_dirs/tsm')
    top1 = runner.message_hub.get_scalar('val/acc/top1').current()
    metrics = test('configs/demo/tsm_r18w32_1x1x8_demo.py', 'work_dirs/tsm/epoch_12.pth')

One machine runs them directly. Several processes (GPUs or CPU workers) run the same command
under ``torchrun`` with ``--launcher pytorch``, mmengine's DistributedDataParallel::

    torchrun --nproc_per_node 2 -m tsm_surgery.cli train CONFIG --launcher pytorch

Without CUDA the process group uses gloo and DDP runs on CPU; with CUDA, nothing changes.

Checkpoints: ``load_from`` (and the CHECKPOINT of ``test``) loads with ``weights_only=True``.
``--resume`` resumes full training state (model, optimizer, schedulers, message hub) and is the
explicit opt-in for unpickling a checkpoint in full when the safe loader cannot read it: use it
only for files you trust, such as your own work dir's (see :mod:`.checkpoint`).

A work dir that already holds checkpoints is never trained over unless asked: pass
``--resume`` to continue it or ``--overwrite`` to start again.
"""

import argparse
import copy
import glob
import os
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import compat

compat.apply()

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import is_model_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import tsm_surgery.integrations.mmaction  # noqa: E402,F401  (registers the plugin)
from mmaction.registry import HOOKS, MODELS  # noqa: E402

from .clip_length import sync_clip_length  # noqa: E402

__all__ = ["load_config", "build_runner", "train", "test", "CheckpointKeysHook", "add_arguments", "run"]

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")
ConfigLike = Union[str, Config]


@HOOKS.register_module()
class CheckpointKeysHook(Hook):
    """Stops on a checkpoint whose keys do not match the model, naming the file.

    mmengine loads ``load_from`` with ``strict=False`` and only logs missing keys, so a
    checkpoint of another model "loads" and evaluates at chance.

    Args:
        strict: every model key must be in the checkpoint with the same shape, and the
            checkpoint must have no other keys (for testing). Otherwise only a checkpoint that
            shares no key with the model, or misses backbone keys, is an error (fine-tuning may
            replace the head).
        source: how the user named the file, for the message (e.g. ``'load_from'``).
    """

    priority = "VERY_HIGH"

    def __init__(self, strict: bool = False, source: str = "load_from") -> None:
        self.strict = strict
        self.source = source

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", checkpoint)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        own = model.state_dict()
        path = runner._load_from
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and hasattr(state[k], "shape")
                  and tuple(state[k].shape) != tuple(own[k].shape)]
        backbone_missing = [k for k in missing if k.startswith("backbone.")]
        if self.strict:
            bad = bool(missing or unexpected or shapes)
        else:
            bad = len(missing) == len(own) or bool(backbone_missing)
        if not bad:
            return
        hint = ""
        if unexpected and any(".net." in k for k in unexpected):
            hint = (" Keys with '.net.' come from MMAction2's ResNetTSM; this backbone keeps plain 2D keys: "
                    "drop '.net' from them (revise_keys) or convert the checkpoint once.")
        raise KeyError(
            f"{self.source}={path!r} does not match the model: {len(missing)} of {len(own)} model keys are "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} checkpoint keys are unknown (e.g. {unexpected[:3]}), "
            f"{len(shapes)} have other shapes (e.g. {shapes[:2]}). Check that the config matches the "
            f"checkpoint.{hint}")


def _set_options(cfg: Config, cfg_options: Optional[Dict[str, Any]]) -> None:
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


def load_config(config: ConfigLike, work_dir: Optional[str] = None, cfg_options: Optional[Dict[str, Any]] = None,
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
            wrapper = dict(cfg.get("model_wrapper_cfg") or dict(type="MMDistributedDataParallel", broadcast_buffers=False))
            wrapper["device_ids"] = None
            cfg.model_wrapper_cfg = wrapper
    return cfg


def _existing_checkpoints(work_dir: str) -> List[str]:
    found = sorted(glob.glob(osp.join(work_dir, "*.pth")))
    if osp.isfile(osp.join(work_dir, "last_checkpoint")):
        found.append(osp.join(work_dir, "last_checkpoint"))
    return found


def build_runner(cfg: Config, checkpoint_keys: Optional[CheckpointKeysHook] = None) -> Runner:
    """``Runner.from_cfg`` plus the checkpoint key check."""
    runner = Runner.from_cfg(cfg)
    runner.register_hook(checkpoint_keys or CheckpointKeysHook(strict=False))
    return runner


def train(config: ConfigLike, work_dir: Optional[str] = None, cfg_options: Optional[Dict[str, Any]] = None,
          launcher: str = "none", resume: Union[bool, str] = False, load_from: Optional[str] = None,
          overwrite: bool = False) -> Runner:
    """Trains (and validates) a config with mmengine's Runner.

    Args:
        config: a config path or ``Config``.
        work_dir: where logs and checkpoints go (default ``work_dirs/<config name>``).
        cfg_options: ``{'dotted.key': value}`` overrides, e.g. ``{'train_cfg.max_epochs': 1}``.
        launcher: ``'none'`` for one process, ``'pytorch'`` under torchrun, ``'slurm'``, ``'mpi'``.
        resume: ``True`` continues the work dir's last checkpoint, a path continues that file.
            Resuming is the opt-in for unpickling a trusted checkpoint in full.
        load_from: initial weights (``weights_only=True``); ``None`` keeps the config's.
        overwrite: train in a work dir that already holds checkpoints without resuming.

    Returns:
        The Runner after training. The last validation metrics are in
        ``runner.message_hub.get_scalar('val/acc/top1').current()`` (and ``'val/acc/mean1'``...);
        ``runner.model`` holds the trained model.

    Raises:
        FileExistsError: the work dir holds checkpoints and neither ``resume`` nor ``overwrite``.
        FileNotFoundError: the config, an annotation file, a video folder or a checkpoint is missing.
        KeyError: an unknown model type or a checkpoint whose keys do not match.
    """
    cfg = load_config(config, work_dir, cfg_options, launcher)
    if load_from is not None:
        cfg.load_from = load_from
    if isinstance(resume, str):
        cfg.load_from, resume = resume, True
    cfg.resume = bool(resume or cfg.get("resume", False))
    if resume:
        cfg.trusted_resume = True
    existing = _existing_checkpoints(cfg.work_dir)
    if existing and not cfg.resume and not overwrite:
        raise FileExistsError(
            f"work dir {cfg.work_dir!r} already holds a training run ({osp.basename(existing[0])}, ...). "
            "Pass --resume to continue it, --overwrite to train over it, or choose another --work-dir.")
    if cfg.resume and cfg.get("load_from") is None and not osp.isfile(osp.join(cfg.work_dir, "last_checkpoint")):
        raise FileNotFoundError(f"--resume: work dir {cfg.work_dir!r} has no last_checkpoint to resume from; "
                                "pass the checkpoint path (--resume PATH) or train without --resume.")
    if cfg.get("load_from") and not osp.isfile(cfg.load_from) and "://" not in cfg.load_from:
        raise FileNotFoundError(f"load_from={cfg.load_from!r} does not exist.")
    _required_files(cfg, ("train", "val") if cfg.get("val_cfg") else ("train",))
    runner = build_runner(cfg, CheckpointKeysHook(strict=False, source="load_from"))
    runner.train()
    return runner


def test(config: ConfigLike, checkpoint: str, work_dir: Optional[str] = None,
         cfg_options: Optional[Dict[str, Any]] = None, launcher: str = "none") -> Dict[str, float]:
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


def _parse_cfg_options(values: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return dict(values) if values else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tsm-surgery train``."""
    parser.add_argument("config", help="MMAction2 config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default work_dirs/<config name>)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help="'pytorch' under torchrun for DDP (gloo on CPU, nccl on CUDA)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config keys, e.g. train_cfg.max_epochs=1")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="resume full training state from the work dir's last checkpoint (or CHECKPOINT). "
                             "Unpickles the checkpoint in full if it holds more than weights: trusted files only")
    parser.add_argument("--load-from", help="initial weights, loaded with weights_only=True")
    parser.add_argument("--overwrite", action="store_true",
                        help="train in a work dir that already holds checkpoints, replacing them")


def run(args: argparse.Namespace) -> int:
    """Runs ``tsm-surgery train``."""
    train(args.config, work_dir=args.work_dir, cfg_options=_parse_cfg_options(args.cfg_options),
          launcher=args.launcher, resume=args.resume, load_from=args.load_from, overwrite=args.overwrite)
    return 0

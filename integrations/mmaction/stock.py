"""Drop-in equivalents of MMAction2's stock TSM backbones, built by graph surgery.

A stock TSM config carries over by changing only its backbone ``type`` (and adding
``custom_imports``)::

    _base_ = ['mmaction::recognition/tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.py']
    custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)
    model = dict(backbone=dict(type='TSMSurgeryResNet'))

Each type takes the stock type's keyword arguments and, with equal weights, gives its outputs.
Its ``state_dict`` keys are the plain 2D network's: a stock checkpoint's ``.net`` (shift
wrapper) and ``.block`` (non-local wrapper) segments are dropped.

The stock rules are rules of the surgery here, not copies of the stock classes:

* shifts sit on residual branches (``shift_place='blockres'``) or block inputs (``'block'``);
  once a stage has :data:`EVERY_OTHER_BLOCK_FROM` or more blocks, every other block of every
  stage is shifted (a site rule, the ``select`` callable);
* non-local blocks and temporal pooling are modules inserted after a named block or stage;
* MobileOne's shifts sit on each block's input (``SHIFT_INPUT_RULES`` in :mod:`.backbone`).
"""

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from mmaction.registry import MODELS
from torch import nn
from torch.nn.modules.utils import _ntuple

import tsm_surgery

from . import _temporal
from ._zoo import resolve_pretrained
from .backbone import TSMSurgeryBackbone

__all__ = ["STOCK_EQUIVALENTS", "EVERY_OTHER_BLOCK_FROM", "resolve_pretrained", "TSMSurgeryResNet",
           "TSMSurgeryMobileNetV2", "TSMSurgeryMobileOne"]

# ResNetTSM and the paper's make_temporal_shift: with a stage this deep (ResNet-101's 23-block
# layer3), only blocks 0, 2, 4, ... of every stage are shifted (18 sites in ResNet-101, not 33).
EVERY_OTHER_BLOCK_FROM = 23

# Side of the example image the conversion learns shapes from: these CNNs' sites do not depend
# on it, and a small one keeps building a model fast.
_EXAMPLE_SIZE = 64

# Stock kwargs whose settings the surgery cannot honour, with the reason given to the user.
_REFUSED = {
    "with_cp": (True, "activation checkpointing branches on x.requires_grad inside forward, which "
                      "tracing cannot follow; the converted net already rebuilds shifts in backward "
                      "instead of storing them (net.recompute_shifts)"),
    "is_shift": (False, "a network without temporal shifts is a TSN; name the 2D type ('ResNet', "
                        "'MobileNetV2', 'mmpretrain.MobileOne') as the backbone instead"),
}


def _check_kwargs(stock: str, cls: type, kwargs: dict[str, Any], **given: Any) -> None:
    """Refuses what ``cls`` (the 2D type) does not take and the settings in ``_REFUSED``."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"model.backbone: {stock} has no argument(s) {unknown}. The surgery type takes {stock}'s "
                        f"TSM arguments, 'direction', 'uni_slot', and these of its 2D type {cls.__name__}: "
                        f"{sorted(accepted)}.")
    given = dict(kwargs, **given)
    for key, (value, reason) in _REFUSED.items():
        if key in given and given[key] is value:
            raise ValueError(f"model.backbone.{key}={value!r} is not supported by the surgery type: {reason}.")


def _every_other_block(stage_sizes: Sequence[int]) -> Callable | None:
    if max(stage_sizes) < EVERY_OTHER_BLOCK_FROM:
        return None

    def even_blocks(site) -> bool:
        index = re.search(r"\.(\d+)$", site.name)
        return index is not None and int(index.group(1)) % 2 == 0

    return even_blocks


class _StockBackbone(TSMSurgeryBackbone):
    """What the three types share: the ``pretrained2d`` switch and per-module clip lengths."""

    def _finish(self, pretrained2d: bool, pretrained: str | None) -> None:
        self.pretrained2d = pretrained2d
        self._pretrained = pretrained
        self._divisors: dict[nn.Module, int] = {}

    @TSMSurgeryBackbone.num_segments.setter
    def num_segments(self, value: int) -> None:
        value = int(value)
        self._net.n_segments = value
        for module in _temporal.temporal_modules(self):
            module.n_segments = value // self._divisors.get(module, 1)

    def _insert(self, path: str, name: str, module: nn.Module, where: str = "after", root: bool = False) -> str:
        """Registers ``module`` (as ``path.name``, or ``name`` at the root) and calls it at ``path``'s boundary."""
        target = name if root else f"{path}.{name}"
        tsm_surgery.insert_module(self._net, target, module, at=path, where=where)
        if root:
            self.add_module(name, module)
        return target

    def init_weights(self) -> None:
        """The 2D network's own init, then the stock ``pretrained`` weights (strictly, weights only)."""
        if getattr(self, "_is_init", False):
            return
        self._init_2d()
        self._is_init = True

    def _init_2d(self) -> None:
        TSMSurgeryBackbone.init_weights(self)
        if self._pretrained:
            path, prefix = resolve_pretrained(self._pretrained)
            self.load_pretrained(path, prefix)


@MODELS.register_module()
class TSMSurgeryResNet(_StockBackbone):
    """``ResNetTSM``'s equivalent: MMAction2's ``ResNet`` converted by surgery.

    Takes ``ResNetTSM``'s arguments (and ``ResNet``'s), plus ``direction`` (``'uni'`` for
    online models) and ``uni_slot``. ``non_local`` places mmcv ``NonLocal3d`` blocks (keys
    ``layerK.i.non_local_block.*``) after the chosen blocks; ``temporal_pool`` max-pools
    time by 2 after ``layer1``, and the later shifts then see ``num_segments // 2`` frames.
    ``pretrained`` (a name :func:`resolve_pretrained` takes: ``'torchvision://resnet50'``, a
    URL or a path) is read by ``init_weights`` with ``weights_only=True``. With
    ``pretrained2d=True`` (the default) it is a torchvision- or ResNet-layout 2D checkpoint
    mapped by MMAction2's ``ResNet`` (non-strict, as ``ResNetTSM``); with ``pretrained2d=False``
    a checkpoint of this type's own keys, loaded strictly.

    Example:
        >>> backbone = dict(type='TSMSurgeryResNet', depth=50, num_segments=8, shift_div=8)
    """

    def __init__(self, depth: int, num_segments: int = 8, is_shift: bool = True,
                 non_local: Sequence = (0, 0, 0, 0), non_local_cfg: dict | None = None, shift_div: int = 8,
                 shift_place: str = "blockres", temporal_pool: bool = False, pretrained2d: bool = True,
                 direction: str = "bi", uni_slot: str = "past", **kwargs):
        from mmaction.models.backbones import ResNet

        _check_kwargs("ResNetTSM", ResNet, kwargs, is_shift=is_shift)
        if shift_place not in ("blockres", "block"):
            raise ValueError(f"model.backbone.shift_place={shift_place!r}: ResNetTSM takes 'blockres' or 'block'.")
        non_local_cfg = dict(non_local_cfg or {})
        pretrained = kwargs.pop("pretrained", None)
        model2d = ResNet(depth, **kwargs)
        stages = [getattr(model2d, name) for name in model2d.res_layers]
        plan = _non_local_plan(non_local, non_local_cfg, [len(s) for s in stages])
        if temporal_pool:
            _check_temporal_pool(num_segments, plan, model2d.out_indices)
        select = _every_other_block([len(s) for s in stages]) if shift_place == "blockres" else None
        super().__init__(model2d, num_segments=num_segments, shift_div=shift_div, shift_place=shift_place,
                         direction=direction, uni_slot=uni_slot, select=select, example_input_size=_EXAMPLE_SIZE)
        self._finish(pretrained2d, pretrained)
        for path in plan:
            block = self._net.get_submodule(path)
            self._insert(path, "non_local_block", _temporal.NonLocalTSM(_out_channels(block), num_segments,
                                                                         **non_local_cfg))
        if temporal_pool:
            target = self._insert(model2d.res_layers[0], "temporal_pool", _temporal.TemporalMaxPool(num_segments),
                                  root=True)
            for name in _temporal.downstream_targets(self._net.eval_graph, target):
                self._divisors[self._net.get_submodule(name)] = 2
            self.num_segments = num_segments

    def _init_2d(self) -> None:
        if not (self.pretrained2d and self._pretrained):
            return super()._init_2d()
        # ResNet maps torchvision's names onto its own (non-strict, like ResNetTSM) from a local file.
        self._model2d.pretrained = resolve_pretrained(self._pretrained)[0]
        try:
            TSMSurgeryBackbone.init_weights(self)
        finally:
            self._model2d.pretrained = None


def _non_local_plan(non_local: Sequence, cfg: dict, stage_sizes: Sequence[int]) -> tuple[str, ...]:
    """Block paths (``layerK.i``) that get a non-local block, as ResNetTSM reads ``non_local``."""
    stages = _ntuple(len(stage_sizes))(non_local)
    plan = []
    for k, (flags, size) in enumerate(zip(stages, stage_sizes)):
        flags = _ntuple(size)(flags) if isinstance(flags, int) else tuple(flags)
        if len(flags) > size:
            raise ValueError(f"model.backbone.non_local: stage {k + 1} has {size} blocks, got {len(flags)} flags.")
        plan += [f"layer{k + 1}.{i}" for i, flag in enumerate(flags) if flag]
    if plan and not cfg:
        raise ValueError("model.backbone.non_local places non-local blocks but non_local_cfg is empty; ResNetTSM "
                         "silently builds none then. Give non_local_cfg (e.g. dict(mode='embedded_gaussian')) or "
                         "drop non_local.")
    return tuple(plan)


def _check_temporal_pool(num_segments: int, plan: Sequence[str], out_indices: Sequence[int]) -> None:
    if num_segments % 2:
        raise ValueError(f"model.backbone.temporal_pool halves the clip: num_segments must be even, "
                         f"got {num_segments}.")
    if plan:
        raise ValueError("model.backbone: non_local with temporal_pool is not supported: ResNetTSM reshapes the "
                         "non-local input with the full num_segments after the pool halved it, mixing clips.")
    if 0 in tuple(out_indices):
        raise ValueError("model.backbone: temporal_pool with out_indices containing 0 is not supported: "
                         "layer1's output would be returned before the pool in ResNetTSM.")


def _out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


@MODELS.register_module()
class TSMSurgeryMobileNetV2(_StockBackbone):
    """``MobileNetV2TSM``'s equivalent: MMAction2's ``MobileNetV2`` with its residual branches shifted.

    Takes ``MobileNetV2TSM``'s arguments (and ``MobileNetV2``'s), plus ``direction``.
    ``pretrained`` (``'mmcls://mobilenet_v2'``, a URL or a path) is read by ``init_weights``
    with ``weights_only=True`` and loaded strictly, as ``MobileNetV2TSM`` does.

    Example:
        >>> backbone = dict(type='TSMSurgeryMobileNetV2', num_segments=8, shift_div=8)
    """

    def __init__(self, num_segments: int = 8, is_shift: bool = True, shift_div: int = 8,
                 pretrained2d: bool = True, direction: str = "bi", uni_slot: str = "past", **kwargs):
        from mmaction.models.backbones import MobileNetV2

        _check_kwargs("MobileNetV2TSM", MobileNetV2, kwargs, is_shift=is_shift)
        pretrained = kwargs.pop("pretrained", None)
        model2d = MobileNetV2(**kwargs)
        super().__init__(model2d, num_segments=num_segments, shift_div=shift_div, direction=direction,
                         uni_slot=uni_slot, example_input_size=_EXAMPLE_SIZE)
        self._finish(pretrained2d, pretrained)


@MODELS.register_module()
class TSMSurgeryMobileOne(_StockBackbone):
    """``MobileOneTSM``'s equivalent: mmpretrain's ``MobileOne`` with each block's input shifted.

    Takes ``MobileOneTSM``'s arguments (``arch``, ``deploy``, ``init_cfg``, ...), plus
    ``direction``. With ``pretrained2d=True`` (the default), ``init_cfg=dict(type='Pretrained',
    checkpoint=..., prefix='backbone')`` loads strictly, as ``MobileOneTSM`` does.

    Example:
        >>> backbone = dict(type='TSMSurgeryMobileOne', arch='s4', num_segments=8)
    """

    def __init__(self, arch: Any, num_segments: int = 8, is_shift: bool = True, shift_div: int = 8,
                 pretrained2d: bool = True, direction: str = "bi", uni_slot: str = "past", **kwargs):
        try:
            from mmpretrain.models import MobileOne
        except ImportError as err:
            raise ImportError("TSMSurgeryMobileOne needs mmpretrain: pip install 'tsm_surgery[mmaction]' "
                              "or pip install mmpretrain==1.2.0.") from err
        _check_kwargs("MobileOneTSM", MobileOne, kwargs, is_shift=is_shift)
        model2d = MobileOne(arch, **kwargs)
        super().__init__(model2d, num_segments=num_segments, shift_div=shift_div, direction=direction,
                         uni_slot=uni_slot, example_input_size=_EXAMPLE_SIZE)
        self._finish(pretrained2d, None)

    def _init_2d(self) -> None:
        cfg = self._model2d.init_cfg
        if not (self.pretrained2d and isinstance(cfg, dict) and cfg.get("type") == "Pretrained"):
            return super()._init_2d()
        path, prefix = resolve_pretrained(cfg["checkpoint"])
        if cfg.get("prefix"):
            prefix = cfg["prefix"].rstrip(".") + "."
        self.load_pretrained(path, prefix)


STOCK_EQUIVALENTS = {
    "ResNetTSM": "TSMSurgeryResNet",
    "MobileNetV2TSM": "TSMSurgeryMobileNetV2",
    "MobileOneTSM": "TSMSurgeryMobileOne",
}

"""``TSMSurgeryBackbone``: any 2D backbone MMAction2 users write today, converted to TSM.

The wrapped network is an MMAction2 backbone dict (``ResNet``, ``MobileNetV2``, ...), a
``timm.<name>`` model or a ``torchvision.<name>`` model. It is converted with
:func:`tsm_surgery.convert` and returns NCHW features, as MMAction2's ``ResNetTSM`` does, so
the stock ``TSMHead``/``TSNHead`` take them unchanged.

The converted modules are this module's own children, so its ``state_dict()`` keys are the 2D
network's keys: a 2D (ImageNet or TSN) checkpoint loads unchanged.
"""

import copy
import importlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from mmaction.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn

import tsm_surgery
from tsm_surgery.integrations.checkpoints import layout_adapter
from tsm_surgery.integrations.checkpoints.loading import match_state_dict, read_checkpoint, state_dict_of

from ._zoo import local_pretrained

__all__ = ["TSMSurgeryBackbone", "SHIFT_PLACES", "build_2d_backbone"]


def print_log_level(level: int, message: str) -> None:
    """``log(level, message)`` into mmengine's current logger (the checkpoint importer's notes)."""
    print_log(message, logger="current", level=level)

# ResNetTSM's vocabulary -> tsm_surgery.convert's `place`.
SHIFT_PLACES = {"blockres": "residual", "block": "block", "residual": "residual"}
FEATURE_SHAPES = (None, "NCHW", "NHWC", "NLC")
# Networks whose blocks have no residual join get their shifts on each block's input instead;
# MobileOneTSM's rule: outside the block, so the block still reparameterises (deploy=True).
SHIFT_INPUT_RULES = {"MobileOne": ("stage0", "stage[1-9].*")}


def _build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    # num_classes=0 drops the classifier and global_pool='' keeps the map: forward() then
    # returns the NCHW features the stock heads pool themselves.
    kwargs = {"num_classes": 0, "global_pool": "", **kwargs}
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise KeyError(f"model.backbone.backbone.type='timm.{name}': timm has no model {name!r}. "
                           "Hint: list the names with timm.list_models('*pattern*').") from err
        raise


class _TorchvisionFeatures(nn.Module):
    """The ``features`` part of a torchvision classifier, kept under that name.

    Recognizer2D keeps the whole torchvision model and runs ``backbone.features``, so a TSN
    checkpoint names its weights ``backbone.features.<...>``; holding the part under the same
    attribute gives the wrapped backbone those keys (``features.conv0.weight``, not ``conv0.weight``).
    """

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        model = torchvision.models.get_model(name, **kwargs)
    except ValueError as err:
        raise KeyError(f"model.backbone.backbone.type='torchvision.{name}': {err}. Hint: "
                       "torchvision.models.list_models() lists the names.") from err
    if hasattr(model, "features"):
        # The convolutional part, as Recognizer2D runs it (backbone.features), under the same name.
        return _TorchvisionFeatures(model.features)
    if hasattr(model, "layer4"):
        # ResNet family: everything up to the last stage; module names (keys) are kept.
        return create_feature_extractor(model, {"layer4": "features"})
    raise ValueError(f"torchvision.{name} has neither `.features` nor `.layer4`; wrap its feature part in "
                     "your own nn.Module and register it in MODELS, then name that type.")


def _build_openmmlab(prefix: str, name: str, cfg: dict[str, Any]) -> nn.Module:
    """``mmcls.<Type>`` / ``mmpretrain.<Type>``, as Recognizer2D builds them (mmpretrain is mmcls renamed)."""
    for package in ("mmcls", "mmpretrain") if prefix == "mmcls" else ("mmpretrain",):
        try:
            importlib.import_module(f"{package}.models")  # registers its models under its scope
        except ImportError:
            continue
        if MODELS.get(f"{package}.{name}") is None:
            raise KeyError(f"model.backbone.backbone.type='{prefix}.{name}': {package} has no model {name!r}.")
        return MODELS.build(dict(type=f"{package}.{name}", **cfg))
    raise ImportError(f"model.backbone.backbone.type='{prefix}.{name}' needs mmpretrain (mmcls's successor). "
                      "Hint: pip install 'tsm_surgery[mmaction]' or pip install mmpretrain==1.2.0.")


def build_2d_backbone(cfg: dict | nn.Module) -> tuple[nn.Module, str | None]:
    """The 2D network and the layout its features come in (``None``: NCHW or a tuple of NCHW maps)."""
    if isinstance(cfg, nn.Module):
        return cfg, None
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"model.backbone.backbone must be a dict with a 'type' key (or an nn.Module), got {cfg!r}.")
    cfg = dict(cfg)
    kind = cfg.pop("type")
    prefix, _, name = kind.partition(".") if isinstance(kind, str) else ("", "", "")
    if prefix in ("timm", "torchvision"):
        # Recognizer2D's own key for these backbones: read here, never passed to the model.
        feature_shape = cfg.pop("feature_shape", None)
        if feature_shape not in FEATURE_SHAPES:
            raise ValueError(f"model.backbone.backbone.feature_shape={feature_shape!r} is not one of {FEATURE_SHAPES}.")
        build = _build_timm if prefix == "timm" else _build_torchvision
        model = build(name, cfg)
        if feature_shape is None and getattr(model, "output_fmt", "NCHW") == "NHWC":
            feature_shape = "NHWC"  # timm's Swin and friends say so themselves
        return model, feature_shape
    if prefix in ("mmcls", "mmpretrain"):
        return _build_openmmlab(prefix, name, cfg), None
    if isinstance(kind, str) and (kind.endswith("TSM") or kind.startswith("TSMSurgery")):
        raise ValueError(f"model.backbone.backbone.type={kind!r} is already a TSM network; wrap its 2D "
                         f"form instead (e.g. 'ResNet' for 'ResNetTSM', 'MobileNetV2' for 'MobileNetV2TSM').")
    if isinstance(kind, str) and MODELS.get(kind) is None:
        raise KeyError(
            f"model.backbone.backbone.type={kind!r} is not a registered MMAction2 model. Hint: use an "
            f"MMAction2 backbone ('ResNet', 'MobileNetV2', ...), 'timm.<name>', 'torchvision.<name>', "
            "'mmpretrain.<name>' or 'mmcls.<name>'; a type from your own package needs custom_imports.")
    return MODELS.build(dict(type=kind, **cfg)), None


def _example_input(model: nn.Module, size: int | None) -> torch.Tensor | None:
    """One image with the channels the first convolution takes (10 for a flow ResNet); ``None``: the core's default."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    if size is None and channels == 3:
        return None
    return torch.randn(1, channels, int(size or 224), int(size or 224))


def _to_nchw(x: torch.Tensor, feature_shape: str | None) -> torch.Tensor:
    """NHWC maps and NLC tokens as NCHW (tokens as an L x 1 map), so the stock heads' pooling applies."""
    if feature_shape == "NHWC" and x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    if x.dim() == 3:  # NLC tokens, as Recognizer2D treats any 3D feature
        return x.transpose(1, 2).unsqueeze(-1)
    return x


@MODELS.register_module()
class TSMSurgeryBackbone(BaseModule):
    """A 2D backbone turned into a Temporal Shift Module network by graph surgery.

    Takes clips folded into the batch, ``(N*T, C, H, W)`` with ``T = num_segments`` frames of
    each clip contiguous (what ``Recognizer2D`` feeds), and returns NCHW feature maps.

    Args:
        backbone: the 2D network: an MMAction2 backbone dict (``dict(type='ResNet', depth=50)``,
            ``dict(type='MobileNetV2')``), ``dict(type='timm.<name>', **kwargs)`` (``num_classes``
            defaults to 0 and ``global_pool`` to ``''`` so features stay NCHW), or
            ``dict(type='torchvision.<name>', **kwargs)`` (its ``.features`` or, for ResNets,
            everything up to ``layer4``), or ``dict(type='mmpretrain.<name>')`` /
            ``dict(type='mmcls.<name>')`` (built by mmpretrain, mmcls's successor, when mmcls
            is absent). A timm/torchvision dict may carry Recognizer2D's ``feature_shape``
            (``'NHWC'``, ``'NLC'``): it is not passed to the model, and features in that layout
            are returned as NCHW maps (tokens as an ``L x 1`` map), so the stock heads pool
            them as Recognizer2D would; timm models that report ``output_fmt='NHWC'`` (Swin)
            need no key.
        num_segments: frames per clip ``T``. :class:`ClipLengthHook` keeps it equal to the
            pipeline's ``SampleFrames`` at run time; it is settable (``backbone.num_segments = 16``).
        shift_div: ``1/shift_div`` of the channels move each way.
        shift_place: ``'blockres'`` (shift the residual branch, ResNetTSM's default) or
            ``'block'`` (shift the block input, in-place TSM).
        direction: ``'bi'`` (past and future) or ``'uni'`` (past only; streamable online).
        pretrained: path of a 2D checkpoint loaded into the 2D network by ``init_weights``, keys
            unchanged, with ``torch.load(weights_only=True)``. A ``state_dict``/``model`` entry is
            used when present.
        pretrained_prefix: keep only checkpoint keys with this prefix and strip it, e.g.
            ``'backbone.'`` for an MMAction2 TSN checkpoint.
        select: which residual sites to shift (glob patterns over site names), see
            :func:`tsm_surgery.convert`.
        leaf_modules: module classes or paths not to trace through.
        example_input_size: side of the square example image used to learn shapes while
            converting; defaults to the model's own input size (224 if unknown).
        no_residual: ``'block_entry'`` converts a network without residual joins (DenseNet, VGG)
            by shifting the input of each block's first layers; see :func:`tsm_surgery.convert`.
        shift_inputs: glob patterns over module paths, matched segment by segment
            (``'stage[1-4].*'``): shift the input of each matching module instead of residual
            sites. MobileOne uses this rule by default (each block's input, as ``MobileOneTSM``).
        uni_slot: with ``direction='uni'``, the channels that come from frame t-1: ``'past'``
            (``[fold, 2*fold)``, a bi-trained network's past slot) or ``'first'`` (``[0, fold)``,
            the paper's online demo); see :func:`tsm_surgery.convert`.
        init_cfg: mmengine's init config. Ignored for the wrapped network (see ``init_weights``).

    Example:
        >>> backbone = dict(type='TSMSurgeryBackbone', num_segments=8,
        ...                 backbone=dict(type='timm.resnet50', pretrained=False))
    """

    def __init__(self,
                 backbone: dict | nn.Module,
                 num_segments: int = 8,
                 shift_div: int = 8,
                 shift_place: str = "blockres",
                 direction: str = "bi",
                 pretrained: str | None = None,
                 pretrained_prefix: str | None = None,
                 select: str | Sequence[str] | None = None,
                 leaf_modules: Sequence[str | type] = (),
                 example_input_size: int | None = None,
                 no_residual: str = "error",
                 shift_inputs: str | Sequence[str] | None = None,
                 uni_slot: str = "past",
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if shift_place not in SHIFT_PLACES:
            raise ValueError(f"model.backbone.shift_place={shift_place!r} is not one of {sorted(SHIFT_PLACES)}: "
                             "'blockres' shifts the residual branch, 'block' the block input.")
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f"model.backbone.pretrained must be a checkpoint path, got {pretrained!r}.")
        self.backbone_cfg = copy.deepcopy(backbone) if isinstance(backbone, dict) else type(backbone).__name__
        self.pretrained = pretrained
        self.pretrained_prefix = pretrained_prefix
        model2d, self.feature_shape = build_2d_backbone(backbone)
        example = _example_input(model2d, example_input_size)
        if shift_inputs is None:
            shift_inputs = SHIFT_INPUT_RULES.get(type(model2d).__name__)
        if shift_inputs is not None:
            if select is not None:
                raise ValueError("model.backbone: select= chooses residual sites and shift_inputs= module inputs; "
                                 "give one of them.")
            patterns = [shift_inputs] if isinstance(shift_inputs, str) else list(shift_inputs)
            net = tsm_surgery.convert(model2d, n_segments=num_segments, shift_div=shift_div, direction=direction,
                                      place="block", example_input=example, leaf_modules=leaf_modules,
                                      inplace=True, uni_slot=uni_slot, shift_inputs=patterns)
        else:
            # inplace=True: the converted net shares the 2D network's modules, so the 2D network's
            # own init_weights/train (norm_eval, frozen stages) still act on them.
            net = tsm_surgery.convert(model2d, n_segments=num_segments, shift_div=shift_div, direction=direction,
                                      place=SHIFT_PLACES[shift_place], select=select, example_input=example,
                                      leaf_modules=leaf_modules, inplace=True, no_residual=no_residual,
                                      uni_slot=uni_slot)
        # Adopt the converted net's children/parameters/buffers so the state_dict keys are the 2D
        # network's; keep the net and the 2D object outside the module tree (no key prefix).
        self._modules.update(net._modules)
        self._parameters.update(net._parameters)
        self._buffers.update(net._buffers)
        self._non_persistent_buffers_set |= set(net._non_persistent_buffers_set)
        object.__setattr__(self, "_net", net)
        object.__setattr__(self, "_model2d", model2d)
        self.train(self.training)

    @property
    def net(self) -> "tsm_surgery.TSMNet":
        """The converted network (shares this module's parameters)."""
        return self._net

    @property
    def model2d(self) -> nn.Module:
        """The wrapped 2D network object (shares this module's parameters)."""
        return self._model2d

    @property
    def sites(self):
        """The shifted residual sites, see :class:`tsm_surgery.ShiftSite`."""
        return self._net.sites

    @property
    def num_segments(self) -> int:
        """Frames per clip; setting it changes every shift without tracing again."""
        return self._net.n_segments

    @num_segments.setter
    def num_segments(self, value: int) -> None:
        self._net.n_segments = int(value)

    @property
    def shift_div(self) -> int:
        return self._net.shift_div

    @property
    def direction(self) -> str:
        return self._net.direction

    def train(self, mode: bool = True) -> "TSMSurgeryBackbone":
        super().train(mode)
        self._net.train(mode)  # switches between the traced train and eval graphs
        custom_train = type(self._model2d).train is not nn.Module.train
        if custom_train:
            # e.g. MMAction2 ResNet's norm_eval and frozen stages act on the shared modules.
            self._model2d.train(mode)
        return self

    def init_weights(self) -> None:
        """Initialises the 2D network its own way, then loads ``pretrained``; once only.

        mmengine's ``BaseModule.init_weights`` would walk into the children and re-initialise
        pretrained timm weights; this method never does. An MMAction2 backbone's own
        ``init_weights`` runs (its ``pretrained`` or its default init); a ``torchvision://``,
        ``open-mmlab://`` or URL name there, or in a ``Pretrained`` ``init_cfg``, is read from
        torch hub's cache with ``weights_only=True`` (fetched there first when missing); timm
        and torchvision models keep the weights they were built with.
        """
        if getattr(self, "_is_init", False):
            return
        inner_init = getattr(self._model2d, "init_weights", None)
        if isinstance(self._model2d, BaseModule) and callable(inner_init):
            # The 2D object is outside the module tree: share mmengine's init bookkeeping with
            # it so it does not act as a top-level module (and delete the records of ours).
            shared = getattr(self, "_params_init_info", None)
            if shared is not None:
                self._model2d._params_init_info = shared
            try:
                with local_pretrained(self._model2d):  # remote names: read from the cache, weights only
                    inner_init()
            finally:
                if shared is not None:
                    self._model2d.__dict__.pop("_params_init_info", None)
        if self.pretrained:
            self.load_pretrained(self.pretrained, self.pretrained_prefix)
        self._is_init = True

    def load_pretrained(self, path: str, prefix: str | None = None) -> None:
        """Loads a 2D checkpoint into the wrapped network (``weights_only=True``), keys unchanged.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            KeyError: the checkpoint's keys do not match the 2D network's (the message lists some).
        """
        source = "model.backbone.pretrained"
        state = state_dict_of(read_checkpoint(path, source=source), path, source, prefix)
        own = self.state_dict()
        hint = ""
        if any(k.startswith("backbone.") for k in state) and not prefix:
            hint = "The checkpoint's keys start with 'backbone.': set model.backbone.pretrained_prefix='backbone.'."
        adapt = layout_adapter(self, f"{source}={path!r}", log=print_log_level)  # MMAction2/paper TSM checkpoints
        state = match_state_dict(state, own, path=path, source=source, allow_unexpected=True, hint=hint, adapt=adapt)
        self.load_state_dict({k: state[k] for k in own}, strict=True)
        unexpected = [k for k in state if k not in own]
        if unexpected:
            print_log(f"TSMSurgeryBackbone: ignored {len(unexpected)} checkpoint keys the 2D feature network "
                      f"does not have (e.g. {unexpected[:3]}) from {path}", logger="current", level=logging.INFO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs ``(N*T, C, H, W)`` clips; returns NCHW features ``(N*T, C', H', W')``."""
        t = self.num_segments
        if x.shape[0] % t != 0:
            raise ValueError(
                f"TSMSurgeryBackbone got {x.shape[0]} frames, not a multiple of model.backbone.num_segments={t}. "
                "The pipeline's SampleFrames num_clips (times clip_len) must equal num_segments: add "
                "custom_hooks=[dict(type='ClipLengthHook')] to keep them equal, or set num_segments.")
        out = self._net(x)
        if isinstance(out, dict):  # torchvision feature extractors
            out = next(iter(out.values()))
        if isinstance(out, (tuple, list)):
            out = out[0] if len(out) == 1 else tuple(_to_nchw(o, self.feature_shape) for o in out)
        return out if isinstance(out, tuple) else _to_nchw(out, self.feature_shape)

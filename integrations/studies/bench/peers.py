"""The models a bench run compares, all from one set of 2D weights.

* ``2d``: the plain image network, the baseline of every ratio, and ``2d copy`` (the A/A
  control, :data:`~.measure.CONTROL`);
* ``ours``: ``tsm_surgery.convert(2d)``;
* ``mmaction``: MMAction2's ``ResNetTSM(shift_place="blockres")`` with the same weights (only
  for ``mmaction:resnetNN`` models);
* ``zero-fill``: ``ours`` with each shift replaced by :class:`ZeroFillShift`, the paper's
  formulation (a zero tensor, then slice assignments), written here as a reference.
"""

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

import tsm_surgery
from tsm_surgery.integrations.models.norms import randomize_norms

from .measure import CONTROL

__all__ = ["ZeroFillShift", "build_2d", "build_models", "shift_inputs", "labelled_shifts",
           "set_mode"]

SHIFT_LABEL = "tsm::temporal_shift"  # the profiler range around every shift module


class ZeroFillShift(nn.Module):
    """The paper's formulation of the bi-directional shift: zeros, then three slice copies.

    Written for comparison only: a full zero-filled output, then channels ``[0, fold)`` copied
    from the next frame, ``[fold, 2*fold)`` from the previous one and the rest in place.

    Example:
        >>> x = torch.randn(8, 16, 2, 2)
        >>> torch.equal(ZeroFillShift(4)(x), tsm_surgery.temporal_shift(x, 4))
        True
    """

    def __init__(self, n_segments: int, shift_div: int = 8):
        super().__init__()
        self.n_segments, self.shift_div = n_segments, shift_div

    def forward(self, x: Tensor, swap: bool = False) -> Tensor:
        """``swap`` (passed by ours' eval graph at in-place sites) is ignored: this form always copies."""
        total, channels = x.shape[0], x.shape[1]
        fold = channels // self.shift_div
        clips = x.reshape(total // self.n_segments, self.n_segments, *x.shape[1:])
        out = torch.zeros_like(clips)
        out[:, :-1, :fold] = clips[:, 1:, :fold]
        out[:, 1:, fold:2 * fold] = clips[:, :-1, fold:2 * fold]
        out[:, :, 2 * fold:] = clips[:, :, 2 * fold:]
        return out.reshape(x.shape)


def build_2d(spec: str) -> tuple[nn.Module, int | None]:
    """The 2D model for ``spec`` (:func:`~tsm_surgery.integrations.models.build_model`) and, for
    ``mmaction:resnetNN``, its depth."""
    from tsm_surgery.integrations.models import build_model, parse_spec

    return build_model(spec), parse_spec(spec).resnet_depth


def _mmaction_peer(plain: nn.Module, depth: int, frames: int) -> nn.Module:
    from mmaction.models.backbones import ResNetTSM

    peer = ResNetTSM(depth=depth, num_segments=frames, shift_div=8, shift_place="blockres",
                     pretrained2d=False, pretrained=None, norm_eval=False)
    # ResNetTSM wraps each shifted conv in its TemporalShift(net=conv): keys gain ".net".
    keys = {k.replace(".net.", "."): k for k in peer.state_dict()}
    peer.load_state_dict({keys[k]: v for k, v in plain.state_dict().items()}, strict=True)
    return peer


def _zero_fill_copy(ours: nn.Module, frames: int) -> nn.Module:
    ref = copy.deepcopy(ours)
    for name, module in list(ref.named_modules()):
        if isinstance(module, tsm_surgery.TemporalShift):
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent), attr, ZeroFillShift(frames, module.shift_div))
    return ref


def set_mode(model: nn.Module, training: bool) -> None:
    model.train(training)  # mmaction's ResNet.train returns None: never chain it


def build_models(spec: str, frames: int, notes: list[str]) -> tuple[dict[str, nn.Module], int | None]:
    """``2d``, the A/A copy, ``ours``, ``mmaction`` (when it applies) and ``zero-fill``, in eval mode.

    A peer that cannot be built is left out with a line in ``notes``; the run goes on.
    """
    plain, depth = build_2d(spec)
    randomize_norms(plain, torch.Generator().manual_seed(1))
    set_mode(plain, False)
    models: dict[str, nn.Module] = {"2d": plain, CONTROL: copy.deepcopy(plain)}
    models["ours"] = tsm_surgery.convert(plain, frames)
    if depth is not None:
        try:
            models["mmaction"] = _mmaction_peer(plain, depth, frames)
        except Exception as err:  # a peer that fails is reported, not fatal
            notes.append(f"MMAction2 ResNetTSM could not be built: {type(err).__name__}: {err}")
    models["zero-fill"] = _zero_fill_copy(models["ours"], frames)
    for model in models.values():
        set_mode(model, False)
    return models, depth


def _is_shift(module: nn.Module) -> bool:
    return isinstance(module, (tsm_surgery.TemporalShift, ZeroFillShift))


def shift_inputs(ours: nn.Module, x: Tensor, autocast: Callable) -> list[Tensor]:
    """The input of every shift module for batch ``x`` (the shapes the op really sees)."""
    captured: list[Tensor] = []

    def keep(_module, args):
        captured.append(args[0].detach().clone(memory_format=torch.preserve_format))

    handles = [m.register_forward_pre_hook(keep) for m in ours.modules() if _is_shift(m)]
    try:
        with torch.no_grad(), autocast():
            ours(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@contextlib.contextmanager
def labelled_shifts(model: nn.Module):
    """Wraps every shift module's call in a ``tsm::temporal_shift`` profiler range (hooks only)."""
    open_ranges = []

    def enter(_module, _args):
        label = torch.profiler.record_function(SHIFT_LABEL)
        label.__enter__()
        open_ranges.append(label)

    def leave(_module, _args, _out):
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if _is_shift(module):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

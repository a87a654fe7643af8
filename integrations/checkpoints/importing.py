"""TSM checkpoints from MMAction2 and from the paper's code, in this project's keys.

Three layouts are read (``LAYOUTS``):

* ``mmaction2``: a recognizer (or backbone) trained with MMAction2's ``ResNetTSM``,
  ``MobileNetV2TSM``, ``MobileOneTSM`` or TPN's ``ResNetTSM``. Each shift wraps a module, so
  its keys gain ``.net`` (``backbone.layer1.0.conv1.conv.net.weight``); ``non_local`` blocks
  wrap theirs as ``.block``. Dropping the wrappers gives this project's keys.
* ``paper``: mit-han-lab/temporal-shift-module's ``TSN`` (ResNet or MobileNetV2), saved from
  ``DataParallel``: ``module.base_model.layer1.0.conv1.net.weight``, classifier ``module.new_fc.*``.
  ResNet keys become torchvision's; the paper's flat MobileNetV2 blocks
  (``features.i.conv.0..7``) are mapped onto torchvision's nested ``mobilenet_v2``.
* ``paper-online``: the paper's online demo MobileNetV2 (``features.i.conv.0..7``,
  ``classifier.*``), whose shift lives in ``forward``: run it with
  ``convert(..., direction='uni', uni_slot='first')``.

Without a model the keys are the plain 2D network's: MMAction2 recognizer keys, or torchvision
``resnet*``/``mobilenet_v2`` keys (checked against that torchvision model). With a model they
are fitted to ``model.state_dict()``: placed under ``backbone.``, the classifier moved to the
model's (``cls_head.fc_cls``), torchvision and MMAction2 ResNet naming translated, and then
checked strictly: every model key filled, every checkpoint tensor placed (a classifier or neck
the model does not have is left out and logged), equal shapes, and the model shifting the same
blocks as the checkpoint's model did. Weights trained with another shift direction or uni slot
than the model's load with a warning: a bi-directional model cannot stream until fine-tuned as uni.

The checkpoint loader (``load_from``, ``tsm-surgery test``, ``pretrained=``, ``--checkpoint``)
imports these layouts through :func:`layout_adapter`.

Example:
    >>> import torchvision, tsm_surgery
    >>> net = tsm_surgery.convert(torchvision.models.resnet50(num_classes=174), n_segments=8)
    >>> state = import_tsm_checkpoint("TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth",
    ...                               model=net)  # doctest: +SKIP
    >>> net.load_state_dict(state)  # doctest: +SKIP
"""

import logging
import os
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .layouts import DETECTORS, LAYOUTS, CheckpointLayout, StateDict, tv_to_mm_resnet
from .loading import read_checkpoint

__all__ = ["import_tsm_checkpoint", "check_checkpoint_layout", "shift_for_checkpoint", "convert_state_dict",
           "layout_adapter", "detect_layout", "read_state_dict", "CheckpointLayout", "CheckpointLayoutError", "LAYOUTS"]

logger = logging.getLogger(__name__)

# (strip, add): where the 2D network's keys may sit in the model, e.g. under a recognizer's
# `backbone.`, or with torchvision's `features.` dropped by TSMSurgeryBackbone.
_MOVES = (("", ""), ("", "backbone."), ("backbone.", ""), ("features.", "backbone."), ("features.", ""))
_SHOW = 5  # keys named in an error
Log = Callable[[int, str], None]  # log(level, message)


class CheckpointLayoutError(ValueError):
    """A checkpoint of no known layout, or one whose weights do not fit the model."""


def read_state_dict(path_or_state_dict: str | os.PathLike | dict) -> tuple[StateDict, str]:
    """Reads a checkpoint file (``weights_only=True``) or takes a dict; returns its tensors and a name.

    A ``state_dict`` or ``model`` entry (mmengine's and the paper's files) is used when present.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.path.expanduser(os.fspath(path_or_state_dict))
        obj = read_checkpoint(source, source="checkpoint")
    elif isinstance(path_or_state_dict, dict):
        source, obj = "<state_dict>", path_or_state_dict
    else:
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(path_or_state_dict).__name__}.")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointLayoutError(f"{source}: holds no state dict (got {type(obj).__name__}).")
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointLayoutError(f"{source}: entries {others[:_SHOW]} are not tensors; expected a state dict "
                                    "(or a dict with a 'state_dict' entry).")
    return dict(obj), source


def _detect(state: StateDict, source: str) -> tuple[CheckpointLayout, StateDict]:
    stripped = state
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        stripped = {k[len("module."):]: v for k, v in state.items()}
    for detector in DETECTORS:
        try:
            found = detector(stripped)
        except ValueError as err:
            raise CheckpointLayoutError(f"{source}: {err}") from err
        if found is not None:
            return found
    tops = sorted({k.split(".")[0] for k in stripped})
    raise CheckpointLayoutError(
        f"{source}: no known TSM checkpoint layout: {len(state)} tensors, top-level names {tops[:8]}, "
        f"first keys {list(state)[:_SHOW]}. Known layouts: "
        + "; ".join(f"{name} ({text})" for name, text in LAYOUTS.items())
        + ". Hint: a checkpoint of this project's own models (plain 2D keys, no `.net`) needs no import: "
        "load it as it is.")


def detect_layout(path_or_state_dict: str | os.PathLike | dict) -> CheckpointLayout:
    """Which layout a checkpoint has (see ``LAYOUTS``), with a one-line description.

    Raises:
        CheckpointLayoutError: no known layout; the message names what was seen.
    """
    state, source = read_state_dict(path_or_state_dict)
    return _detect(state, source)[0]


def _reference_shapes(layout: CheckpointLayout, state: StateDict) -> dict[str, torch.Size] | None:
    """The torchvision model a paper checkpoint maps onto, as key -> shape (built on the meta device)."""
    if layout.name == "mmaction2":
        return None
    try:
        import torchvision
    except ImportError:
        return None
    builder = getattr(torchvision.models, layout.arch, None)
    if builder is None:
        raise CheckpointLayoutError(f"detected {layout}, but its block counts match no torchvision ResNet depth "
                                    "(18, 34, 50, 101, 152).")
    kwargs = {"num_classes": state[layout.head + ".weight"].shape[0]} if layout.head else {}
    with torch.device("meta"):
        reference = builder(**kwargs)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    if not layout.head:
        head = "fc." if layout.arch.startswith("resnet") else "classifier."
        shapes = {k: v for k, v in shapes.items() if not k.startswith(head)}
    return shapes


_COUNTERS = ("num_batches_tracked",)  # integer buffers a checkpoint may hold, or lack (older torch)


def _tensor_problem(key: str, value: torch.Tensor) -> str | None:
    if value.is_meta:
        return "is on the meta device (a shape without data)"
    if value.layout != torch.strided:
        return f"is a {str(value.layout).replace('torch.', '')} tensor, not a dense one"
    if value.is_complex():
        return f"is complex ({value.dtype})"
    if key.rsplit(".", 1)[-1] in _COUNTERS:
        return None if not value.is_floating_point() else f"is a counter with dtype {value.dtype}"
    if not value.is_floating_point():
        return f"has dtype {str(value.dtype).replace('torch.', '')}, not a floating-point one"
    if not bool(torch.isfinite(value).all()):
        return "holds NaN or infinite values"
    return None


def _check_tensors(state: StateDict, source: str) -> None:
    """Real storage, dense, floating point (counters aside), finite: what any weight must be."""
    for key, value in state.items():
        problem = _tensor_problem(key, value)
        if problem:
            raise CheckpointLayoutError(f"{source}: tensor {key!r} {problem}; weights are dense, finite floating-point "
                                        "tensors. Hint: the file is damaged or not a trained model's checkpoint.")


def _check_norm_groups(state: StateDict, source: str) -> None:
    """A norm layer's weight, bias and running statistics have one length, that of the conv before it."""
    for mean_key in [k for k in state if k.endswith(".running_mean")]:
        owner = mean_key[: -len(".running_mean")]
        shapes = {leaf: tuple(state[f"{owner}.{leaf}"].shape) for leaf in ("weight", "bias", "running_mean",
                  "running_var") if f"{owner}.{leaf}" in state}
        conv = re.sub(r"\.bn$", ".conv.weight", owner)  # MMAction2's ConvModule: X.conv then X.bn
        if conv != owner + ".conv.weight" and conv in state and state[conv].dim() > 1:
            shapes[conv] = (state[conv].shape[0],)
        if len(set(shapes.values())) > 1:
            raise CheckpointLayoutError(f"{source}: the norm layer {owner!r} has inconsistent shapes {shapes}. "
                                        "Hint: the file was edited or damaged; use the checkpoint as trained.")


def _check_resnet_keys(layout: CheckpointLayout, state: StateDict, source: str) -> None:
    """An MMAction2 ResNetTSM checkpoint has exactly the keys of a ResNet of its depth (no model needed)."""
    if layout.arch == "ResNetTSM":  # the block counts gave no depth: a stage lost (or gained) blocks
        counts = tuple(len({m.group(1) for k in state if (m := re.search(rf"(?:^|\.)layer{i}\.(\d+)\.", k))})
                       for i in range(1, 5))
        raise CheckpointLayoutError(f"{source}: detected {layout}; its blocks per stage {counts} are no ResNet "
                                    "depth's (18: 2, 2, 2, 2; 34 and 50: 3, 4, 6, 3; 101: 3, 4, 23, 3; 152: 3, 8, "
                                    "36, 3). Hint: the file was edited or damaged; use the checkpoint as trained.")
    match = re.match(r"ResNetTSM \(depth (\d+)\)", layout.arch)
    try:
        import torchvision
    except ImportError:
        return
    if not match:
        return
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{match.group(1)}")()
    expected = {prefix + tv_to_mm_resnet(k): v.shape for k, v in reference.state_dict().items()
                if not k.startswith("fc.") and not k.endswith(_COUNTERS)}
    found = {k for k in state if k.startswith(prefix) and "non_local_block." not in k and not k.endswith(_COUNTERS)}
    if prefix == "":
        found = {k for k in found if not k.startswith(("cls_head.", "neck."))}
    missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
    # conv1's input channels vary (RGB 3, optical flow 10); everything else is the depth's.
    shapes = [k for k in set(expected) & found if tuple(state[k].shape) != tuple(expected[k])
              and not (k == prefix + "conv1.conv.weight" and state[k].shape[:1] + state[k].shape[2:] ==
                       expected[k][:1] + expected[k][2:])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors of a ResNet-{match.group(1)} are missing (first: {missing[:_SHOW]})")
    if extra:
        parts.append(f"{len(extra)} tensors belong to no ResNet-{match.group(1)} module (first: {extra[:_SHOW]})")
    if shapes:
        k = sorted(shapes)[0]
        parts.append(f"{len(shapes)} have other shapes (first: {k}: {tuple(state[k].shape)} vs {tuple(expected[k])})")
    if parts:
        raise CheckpointLayoutError(f"{source}: detected {layout}; " + "; ".join(parts) + ". Hint: the file was "
                                    "edited or damaged; use the checkpoint as trained.")


def _model_sites(model: nn.Module) -> list[tuple[str, str | None]]:
    """(module path of each shift site in the model's key space, the model's place) for every TSM network in it."""
    found = []
    for name, module in model.named_modules():
        sites = getattr(module, "sites", None)
        if not isinstance(sites, list) or not all(hasattr(s, "name") for s in sites):
            continue
        place = getattr(module, "place", None) or getattr(getattr(module, "net", None), "place", None)
        found += [(f"{name}.{s.name}" if name else s.name, place) for s in sites]
    return found


def _best_mapping(body: Sequence[str], layout: CheckpointLayout, target) -> Callable[[str], str | None]:
    best, best_score = None, -1
    for rename in (lambda k: k,) + tuple(layout.renames):
        for strip, add in _MOVES:
            if not all(k.startswith(strip) for k in body):
                continue

            def move(key, strip=strip, add=add, rename=rename):
                return add + rename(key[len(strip):]) if key.startswith(strip) else None

            mapped = [move(k) for k in body]
            score = sum(m in target for m in mapped)
            if len(set(mapped)) == len(mapped) and score > best_score:
                best, best_score = move, score
    return best


def _fit(state: StateDict, layout: CheckpointLayout, target: dict[str, torch.Size], sites, source: str,
         log: Log, strict: bool = True) -> StateDict:
    """Maps the default naming onto ``target``'s keys; ``strict=False`` (fine-tuning) lets the head differ."""
    head = {k for k in state if layout.head and k.startswith(layout.head + ".")}
    if layout.name == "mmaction2" and any(k.startswith("backbone.") for k in state):
        body = [k for k in state if k.startswith("backbone.")]
    else:
        body = [k for k in state if k not in head]
    rest = [k for k in state if k not in set(body)]
    move = _best_mapping(body, layout, target)
    keymap = {k: move(k) for k in body}
    placed = set(keymap.values())
    unplaced = [k for k in body if keymap[k] not in target]
    left = [t for t in target if t not in placed]
    for k in rest:  # a recognizer's cls_head / neck, where the model has the same keys
        if k in left:
            keymap[k] = k
    left = [t for t in left if t not in keymap.values()]
    rest = [k for k in rest if k not in keymap]
    if rest and left and set(rest) <= head:
        suffixes = sorted(k.rsplit(".", 1)[1] for k in rest)
        owners = {t.rsplit(".", 1)[0] for t in left}
        if len(owners) == 1 and sorted(t.rsplit(".", 1)[1] for t in left) == suffixes:
            owner = owners.pop()
            keymap.update({k: f"{owner}.{k.rsplit('.', 1)[1]}" for k in rest})
            left, rest = [], []
    shapes = [k for k, t in keymap.items() if t in target and tuple(state[k].shape) != tuple(target[t])]
    if not strict:  # the model keeps its own classifier / neck where the checkpoint's has another size
        rest += [k for k in shapes if k not in body]
        keymap = {k: t for k, t in keymap.items() if k not in rest}
        shapes, left = [k for k in shapes if k in body], []
    # BatchNorm's batch counter: older checkpoints lack it, some models do not keep it; it changes no output.
    counters = [t for t in left if t.endswith(_COUNTERS)]
    left = [t for t in left if t not in counters]
    unplaced = [k for k in unplaced if not k.endswith(_COUNTERS)]
    if unplaced or left or shapes:
        raise _mismatch(source, layout, keymap, unplaced, left, shapes, state, target)
    if rest:
        log(logging.INFO, f"{source}: left out {len(rest)} checkpoint tensors the model has no place for "
                          f"({', '.join(rest[:_SHOW])})")
    _check_sites(layout, move, sites, source, state)
    fitted = {keymap[k]: v for k, v in state.items() if k in keymap and keymap[k] in target}
    fitted.update({t: torch.tensor(0, dtype=torch.long) for t in counters})
    return fitted


def _mismatch(source, layout, keymap, unplaced, left, shapes, state, target) -> CheckpointLayoutError:
    parts = []
    if left:
        parts.append(f"{len(left)} model keys get no weights (first: {left[:_SHOW]})")
    if unplaced:
        named = [f"{k} -> {keymap[k]}" if keymap.get(k) not in (None, k) else k for k in unplaced[:_SHOW]]
        parts.append(f"{len(unplaced)} checkpoint tensors have no place in the model (first: {named})")
    if shapes:
        named = [f"{keymap[k]}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[keymap[k]])}"
                 for k in shapes[:_SHOW]]
        parts.append(f"{len(shapes)} shapes differ (first: {named})")
    return CheckpointLayoutError(
        f"{source}: detected {layout}; it does not fit the model: " + "; ".join(parts) + ". Hint: the checkpoint "
        "holds another depth, width or number of classes than the model; build the model it was trained with "
        "(named above).")


def _surely_moves(state: StateDict, shift: str) -> bool:
    """Whether a checkpoint's shift at ``shift`` moved any channel.

    A shift of fewer than ``shift_div`` channels moves none (MobileOneTSM wraps ``stage0``,
    whose input is the 3-channel image), so a model without it computes the same. The input
    width is read from the first conv weight; a grouped conv shows fewer channels than it
    takes, so below 8 the shift may be a no-op and its absence is not reported.
    """
    first = next((v for k, v in state.items() if k.startswith(shift + ".") and v.dim() == 4), None)
    return first is None or first.shape[1] >= 8


def _check_sites(layout: CheckpointLayout, move, sites, source: str, state: StateDict) -> None:
    """The model must shift where the checkpoint's model shifted, or the same weights give other numbers."""
    if not sites or not layout.shifts:
        return
    site_paths = [s for s, _ in sites]
    place_of = dict(sites)
    hit, extra, places = set(), [], set()
    for shift in layout.shifts:
        path = move(shift + ".weight")
        path = path[: -len(".weight")] if path else shift
        owner = next((s for s in site_paths if path == s or path.startswith(s + ".")), None)
        if owner is None:
            if _surely_moves(state, shift):
                extra.append(path)
            continue
        hit.add(owner)
        if place_of[owner]:
            places.add(("block" if path == owner else "residual", place_of[owner]))
    unshifted = [s for s in site_paths if s not in hit]
    problems = []
    if extra:
        problems.append(f"the checkpoint's model shifts {extra[:_SHOW]}, which the model does not")
    if unshifted:
        problems.append(f"the model shifts {len(unshifted)} sites the checkpoint's model did not "
                        f"(first: {unshifted[:_SHOW]})")
    problems += [f"the checkpoint's model shifts at place={ckpt!r}, the model at place={mine!r}"
                 for ckpt, mine in sorted(places) if ckpt != mine]
    if problems:
        raise CheckpointLayoutError(
            f"{source}: detected {layout}, {len(layout.shifts)} shifted blocks; the model has {len(site_paths)} "
            f"shift sites: " + "; ".join(problems) + ". The same weights would give other outputs. Hint: convert "
            "the model with select= (and place=) to shift the checkpoint's blocks, or use the stock-equivalent "
            "MMAction2 backbone type.")


def _shift_settings(model: nn.Module) -> set:
    """The (direction, uni slot) pairs of the model's shift modules, clip and online forms."""
    found = set()
    for module in model.modules():
        name = type(module).__name__
        if name == "TemporalShift" and hasattr(module, "direction"):
            uni = module.direction == "uni"
            found.add((module.direction, getattr(module, "uni_slot", "past") if uni else None))
        elif name == "OnlineShift":
            found.add(("uni", getattr(module, "uni_slot", "past")))
    return found


def _check_direction(layout: CheckpointLayout, model: nn.Module, source: str, log: Log) -> None:
    """Weights trained with one shift run with another give other outputs: say so (fine-tuning is legitimate)."""
    trained = (layout.direction, layout.uni_slot)
    other = sorted(s for s in _shift_settings(model) if s != trained)
    if not other:
        return
    direction, slot = other[0]
    mine = f"direction={direction!r}" + (f", uni_slot={slot!r}" if slot else "")
    theirs = f"direction={layout.direction!r}" + (f", uni_slot={layout.uni_slot!r}" if layout.uni_slot else "")
    advice = ("a bi-directional model cannot stream: fine-tune it as uni before its outputs mean anything"
              if layout.direction == "bi" else "convert with " + theirs + " to reproduce it")
    log(logging.WARNING, f"{source}: the checkpoint's model shifts with {theirs}, this model with {mine}, so its "
                         f"outputs differ from the source model's; {advice}.")


def _log(level: int, message: str) -> None:
    logger.log(level, message)


def convert_state_dict(state: StateDict, model: nn.Module | None = None, source: str = "<state_dict>", *,
                       model_state: dict | None = None, log: Log | None = None, strict: bool = True
                       ) -> tuple[StateDict, CheckpointLayout]:
    """:func:`import_tsm_checkpoint` for a state dict already read; also returns the detected layout.

    ``model_state`` (default ``model.state_dict()``) gives the keys and shapes to fit; ``log``
    (``log(level, message)``, default this module's logger) receives the notes and warnings.
    ``strict=False`` is for fine-tuning: model keys may stay unfilled and a classifier or neck
    of another size is left out; the backbone must still fit exactly.
    """
    log = log or _log
    layout, converted = _detect(state, source)
    _check_tensors(converted, source)
    _check_norm_groups(converted, source)
    if model is None and model_state is None:
        _check_resnet_keys(layout, converted, source)
        target = _reference_shapes(layout, converted)
        return (converted if target is None else _fit(converted, layout, target, [], source, log)), layout
    model_state = model.state_dict() if model_state is None else model_state
    target = {k: v.shape for k, v in model_state.items()}
    fitted = _fit(converted, layout, target, _model_sites(model) if model is not None else [], source, log, strict)
    if model is not None:
        _check_direction(layout, model, source, log)
    return fitted, layout


def layout_adapter(model: nn.Module | None = None, source: str = "checkpoint", log: Log | None = None,
                   strict: bool = True) -> Callable[[StateDict, dict], StateDict]:
    """An ``adapt(state, model_state) -> state`` for the checkpoint loader: imports the anchors' layouts.

    A state dict whose keys are already the model's, or of no known layout, is returned as
    it is (the loader's own strict check then reports any mismatch). A known layout is
    fitted to the model (see :func:`convert_state_dict` for ``strict``), and the detected
    source is logged.
    """
    log = log or _log

    def adapt(state: StateDict, model_state: dict) -> StateDict:
        if set(state) == set(model_state):
            return state
        try:
            _detect(state, source)
        except CheckpointLayoutError:
            return state
        fitted, layout = convert_state_dict(state, model, source, model_state=model_state, log=log, strict=strict)
        hint = f" ({layout.hint})" if layout.hint else ""
        log(logging.INFO, f"{source}: detected {layout}; imported into this model's keys{hint}")
        return fitted

    return adapt


def _no_shift_note(layout: CheckpointLayout, model: nn.Module, source: str, log: Log) -> None:
    """A TSM checkpoint loaded into a model without any shift runs as a 2D network: say so."""
    if layout.shifts and not _shift_settings(model):
        log(logging.WARNING, f"{source}: detected {layout}, {len(layout.shifts)} shifted blocks; the model has no "
                             f"temporal shift, so it computes other outputs than the checkpoint's model until it is "
                             f"converted with {_settings_text(layout.direction, layout.uni_slot)}.")


def _settings_text(direction: str, uni_slot: str | None) -> str:
    return f"direction={direction!r}" + (f", uni_slot={uni_slot!r}" if uni_slot else "")


def _known_layout(checkpoint: str | os.PathLike | dict) -> tuple[CheckpointLayout | None, StateDict, str]:
    state, source = read_state_dict(checkpoint)
    try:
        layout, _ = _detect(state, source)
    except CheckpointLayoutError:
        return None, state, source  # plain 2D weights in the model's own keys, or unknown: the strict loader judges
    return layout, state, source


def shift_for_checkpoint(checkpoint: str | os.PathLike | dict | None, direction: str, uni_slot: str | None,
                         source: str = "checkpoint", log: Log | None = None) -> tuple[str, str]:
    """The ``(direction, uni_slot)`` to convert with, given the shift the checkpoint was trained with.

    ``uni_slot=None`` means the user chose none: a ``"uni"`` model then takes the slot the
    checkpoint's model was trained with (the paper's online MobileNetV2: ``"first"``) and says so;
    otherwise ``"past"``. A slot the user chose is kept (:func:`check_checkpoint_layout` warns).

    Example:
        >>> shift_for_checkpoint(None, "uni", None)
        ('uni', 'past')
    """
    layout = _known_layout(checkpoint)[0] if checkpoint is not None else None
    if uni_slot is None:
        uni_slot = "past"
        if direction == "uni" and layout is not None and layout.direction == "uni" and layout.uni_slot:
            uni_slot = layout.uni_slot
            (log or _log)(logging.INFO, f"{source}: detected {layout}; it was trained with uni_slot={uni_slot!r}, "
                                        f"so the model shifts that slot (choose another with --uni-slot).")
    return direction, uni_slot


def check_checkpoint_layout(checkpoint: str | os.PathLike | dict | None, model: nn.Module,
                            source: str = "checkpoint", log: Log | None = None) -> CheckpointLayout | None:
    """Checks a TSM checkpoint's shift (direction, slot, shifted blocks) against the model that will run it.

    The one check for every path that loads weights before converting (``stream``, ``export``,
    ``convert --checkpoint``): call it with the converted (or online) model. Blocks shifted
    elsewhere than in the checkpoint's model raise; another direction or slot is logged as a
    warning (a bi-trained model cannot stream). A plain 2D checkpoint passes.

    Returns:
        The detected layout, or ``None`` for weights of no known TSM layout.

    Raises:
        CheckpointLayoutError: the model shifts other blocks than the checkpoint's model.
    """
    if checkpoint is None:
        return None
    layout, state, _ = _known_layout(checkpoint)
    if layout is None:
        return None
    log = log or _log
    plain = _plain_model(model)
    convert_state_dict(state, plain, source, log=log)
    _no_shift_note(layout, plain, source, log)
    return layout


def _plain_model(model: nn.Module) -> nn.Module:
    """The clip network behind an online one (its keys and sites are what a checkpoint is fitted to)."""
    return getattr(model, "net", None) if isinstance(getattr(model, "net", None), nn.Module) else model


def import_tsm_checkpoint(path_or_state_dict: str | os.PathLike | dict,
                          model: nn.Module | None = None) -> StateDict:
    """Reads an MMAction2 or paper-repo TSM checkpoint and returns it in this project's keys.

    Args:
        path_or_state_dict: a checkpoint file (read with ``torch.load(weights_only=True)``) or a
            state dict; a ``state_dict`` entry is used when present.
        model: the network to load into (a converted network, a ``TSMSurgeryBackbone`` or an
            MMAction2 recognizer). The keys are fitted to it and checked strictly. Without it
            the keys are the plain 2D network's (see the module docstring).

    Returns:
        A new state dict; neither the input nor the model is changed.

    Raises:
        CheckpointLayoutError: an unknown layout (the message names what was seen), or weights
            that do not fit ``model`` (another depth, width, number of classes or shifted blocks;
            the message names the detected layout and the first mismatching keys).

    Example:
        >>> import torchvision, tsm_surgery
        >>> net = tsm_surgery.convert(torchvision.models.mobilenet_v2(num_classes=27), direction="uni",
        ...                           uni_slot="first")  # doctest: +SKIP
        >>> net.load_state_dict(import_tsm_checkpoint("mobilenetv2_jester_online.pth.tar", net))  # doctest: +SKIP
    """
    state, source = read_state_dict(path_or_state_dict)
    converted, layout = convert_state_dict(state, model, source)
    if model is not None:
        _no_shift_note(layout, model, source, _log)
    logger.info("%s: imported %s", source, layout)
    return converted

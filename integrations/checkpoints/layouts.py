"""The checkpoint layouts of the two anchors, and the key rules that turn them into ours.

Each detector takes a state dict (``module.`` already stripped) and returns ``None`` when the
layout is not its own, or a :class:`CheckpointLayout` and the state dict in the layout's
*default naming*: the keys of the plain 2D network (MMAction2 recognizer keys for MMAction2
checkpoints, torchvision keys for the paper's). Fitting those keys to a given model is
:mod:`.checkpoints`' job.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]

# Every layout this module reads; the value says what identifies it.
LAYOUTS = {
    "mmaction2": "MMAction2 ResNetTSM / MobileNetV2TSM / MobileOneTSM recognizer or backbone (also TPN's "
                 "ResNetTSM): each shift wraps a module as `.net`",
    "paper": "mit-han-lab/temporal-shift-module TSN, ResNet or MobileNetV2: `module.base_model.*` with `.net` "
             "shift wrappers, classifier `new_fc`",
    "paper-online": "the paper's online demo MobileNetV2 (or its 2D ImageNet MobileNetV2): flat blocks "
                    "`features.i.conv.0..7`, classifier `classifier.*`, the shift lives in forward()",
}

# Block counts per stage -> torchvision ResNet depth (bottleneck blocks have a conv3).
_RESNET_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                  ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}


@dataclass(frozen=True)
class CheckpointLayout:
    """What :func:`detect_layout` found in a checkpoint.

    Attributes:
        name: the layout, a key of ``LAYOUTS``.
        arch: the network, e.g. ``'ResNetTSM'``, ``'resnet50'``, ``'mobilenet_v2'``.
        description: one line for logs and errors.
        shifts: module paths (default naming) where the checkpoint's model shifts; a block's own
            path when it shifts the block input, a path inside the block for its residual branch.
        head: key prefix of the classifier in the default naming (``'fc'``, ``'classifier.1'``,
            ``'cls_head.fc_cls'``), or ``None``.
        renames: extra key renames that may fit the model (e.g. torchvision <-> MMAction2 ResNet).
        hint: how to run the weights, when there is something to say.
        direction, uni_slot: the shift the checkpoint's model was trained with (both anchors train
            ``'bi'``; the paper's online demo runs ``'uni'`` with slot ``'first'``).
    """

    name: str
    arch: str
    description: str
    shifts: tuple[str, ...] = ()
    head: str | None = None
    renames: tuple[Callable[[str], str], ...] = field(default=(), compare=False)
    hint: str = ""
    direction: str = "bi"
    uni_slot: str | None = None

    def __str__(self) -> str:
        return self.description


def drop_wrappers(state: StateDict) -> tuple[StateDict, list[str], list[str]]:
    """Drops every ``net`` path component (the anchors' ``TemporalShift``/``TemporalPool`` wrappers).

    Returns the state dict, the shift-wrapped module paths and the pool-wrapped stage paths.
    """
    out, shifts, pools = {}, set(), set()
    for key, value in state.items():
        parts = key.split(".")
        kept: list[str] = []
        for part in parts[:-1]:
            if part == "net":
                # TemporalPool wraps a whole ResNet stage (`layer2`); TemporalShift a layer or block.
                (pools if re.fullmatch(r"(backbone\.)?layer\d+", ".".join(kept)) else shifts).add(".".join(kept))
                continue
            kept.append(part)
        out[".".join(kept + parts[-1:])] = value
    return out, sorted(shifts), sorted(pools)


def _resnet_depth(keys, prefix: str = "") -> int | None:
    counts, bottleneck = [], any(re.match(re.escape(prefix) + r"layer\d+\.\d+\.conv3\.", k) for k in keys)
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + rf"layer{stage}\.(\d+)\.", k))}
        counts.append(max(blocks) + 1 if blocks else 0)
    return _RESNET_DEPTHS.get((tuple(counts), bottleneck))


def tv_to_mm_resnet(key: str) -> str:
    """``layer1.0.bn2.weight`` -> ``layer1.0.conv2.bn.weight`` (torchvision ResNet to MMAction2's)."""
    key = re.sub(r"(^|\.)conv(\d)\.weight$", r"\1conv\2.conv.weight", key)
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.bn.", key)
    key = re.sub(r"\.downsample\.0\.", ".downsample.conv.", key)
    return re.sub(r"\.downsample\.1\.", ".downsample.bn.", key)


def mm_to_tv_resnet(key: str) -> str:
    """The inverse of :func:`tv_to_mm_resnet`."""
    key = re.sub(r"(^|\.)conv(\d)\.conv\.weight$", r"\1conv\2.weight", key)
    key = re.sub(r"(^|\.)conv(\d)\.bn\.", r"\1bn\2.", key)
    key = re.sub(r"\.downsample\.conv\.", ".downsample.0.", key)
    return re.sub(r"\.downsample\.bn\.", ".downsample.1.", key)


def _flat_mobilenet_v2(state: StateDict) -> tuple[StateDict, list[str]]:
    """The paper's flat InvertedResidual ``conv`` (5 or 8 entries) onto torchvision's nesting.

    Returns the renamed state and the blocks the paper shifts: those with 8 entries and equal
    input/output channels (its ``len(m.conv) == 8 and m.use_res_connect``).
    """
    entries: dict[str, set] = {}
    for key in state:
        m = re.match(r"(features\.\d+)\.conv\.(\d+)\.", key)
        if m:
            entries.setdefault(m.group(1), set()).add(int(m.group(2)))
    # 8 entries: pw conv/bn, relu, dw conv/bn, relu, pw-linear conv/bn; 5 entries: dw, relu, pw-linear.
    maps = {7: {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}, 4: {0: "0.0", 1: "0.1", 3: "1", 4: "2"}}
    out, shifted = {}, []
    for key, value in state.items():
        m = re.match(r"(features\.\d+)\.conv\.(\d+)\.(.*)$", key)
        if not m:
            out[key] = value
            continue
        block, index, rest = m.group(1), int(m.group(2)), m.group(3)
        table = maps.get(max(entries[block]))
        if table is None or index not in table:
            raise ValueError(f"{key}: a MobileNetV2 block with conv entries {sorted(entries[block])} is neither the "
                             "paper's 5-entry nor its 8-entry InvertedResidual.")
        out[f"{block}.conv.{table[index]}.{rest}"] = value
    for block, found in entries.items():
        if max(found) == 7:
            inp, oup = state[f"{block}.conv.0.weight"].shape[1], state[f"{block}.conv.6.weight"].shape[0]
            if inp == oup:
                shifted.append(block)
    return out, shifted


def _take_head(state: StateDict, candidates, new_prefix: str) -> tuple[StateDict, str | None]:
    for prefix in candidates:
        if f"{prefix}.weight" in state and state[f"{prefix}.weight"].dim() == 2:
            state = dict(state)
            for suffix in ("weight", "bias"):
                if f"{prefix}.{suffix}" in state:
                    state[f"{new_prefix}.{suffix}"] = state.pop(f"{prefix}.{suffix}")
            return state, new_prefix
    return state, None


def _classes(state: StateDict, head: str | None) -> str:
    return f", {state[head + '.weight'].shape[0]} classes" if head else ", no classifier"


def detect_paper(state: StateDict) -> tuple[CheckpointLayout, StateDict] | None:
    """The paper's ``TSN``: ``base_model.*`` plus ``new_fc.*`` (``module.`` already stripped)."""
    if not any(k.startswith("base_model.") for k in state):
        return None
    base = {k[len("base_model."):] if k.startswith("base_model.") else k: v for k, v in state.items()}
    base, shifts, pools = drop_wrappers(base)
    pool_note = f", temporal pool on {', '.join(pools)}" if pools else ""
    if any(k.startswith("layer1.") for k in base):
        # dropout > 0 keeps the classifier in new_fc; dropout == 0 in base_model.fc.
        base, head = _take_head(base, ("new_fc", "fc"), "fc")
        depth = _resnet_depth(base)
        arch = f"resnet{depth}" if depth else "resnet (unknown depth)"
        desc = (f"paper-repo TSN {arch}, {len(shifts)} shifted blocks{pool_note}{_classes(base, head)}")
        return CheckpointLayout("paper", arch, desc, tuple(shifts), head, (tv_to_mm_resnet,)), base
    if any(k.startswith("features.") for k in base):
        # Some of the paper's MobileNetV2 checkpoints keep the classifier in base_model.classifier.
        base, head = _take_head(base, ("new_fc", "classifier"), "classifier.1")
        base, _ = _flat_mobilenet_v2(base)
        desc = f"paper-repo TSN mobilenet_v2 (flat blocks), {len(shifts)} shifted blocks{_classes(base, head)}"
        shifts = [re.sub(r"\.conv\.0$", ".conv.0.0", s) for s in shifts]
        return CheckpointLayout("paper", "mobilenet_v2", desc, tuple(shifts), head), base
    names = sorted({k.split(".")[0] for k in base})[:6]
    raise ValueError(f"a paper-repo TSN checkpoint (base_model.*) whose base model is neither ResNet nor "
                     f"MobileNetV2 (top-level modules {names}); only those two are supported.")


def detect_paper_online(state: StateDict) -> tuple[CheckpointLayout, StateDict] | None:
    """The online demo's MobileNetV2: flat ``features.i.conv.0..7`` and a plain ``classifier`` Linear."""
    if not (any(re.match(r"features\.\d+\.conv\.7\.", k) for k in state) and "classifier.weight" in state):
        return None
    base, head = _take_head(state, ("classifier",), "classifier.1")
    base, shifted = _flat_mobilenet_v2(base)
    desc = (f"paper online-demo mobilenet_v2 (flat blocks, shift in forward: {len(shifted)} residual blocks)"
            f"{_classes(base, head)}")
    hint = ("it streams as the paper's demo with convert(..., direction='uni', uni_slot='first') and to_online; "
            "a 2D ImageNet checkpoint of the same layout loads the same way")
    return CheckpointLayout("paper-online", "mobilenet_v2", desc, tuple(f"{b}.conv.0.0" for b in shifted), head,
                            hint=hint, direction="uni", uni_slot="first"), base


def _mmaction_arch(keys) -> str | None:
    if any(re.search(r"(^|\.)layer\d+\.\d+\.(block\.)?conv\d\.conv\.net\.", k) for k in keys) or any(
            re.search(r"(^|\.)layer\d+\.(net\.)?\d+\.net\.conv1\.", k) for k in keys):
        return "ResNetTSM"
    if any(re.search(r"(^|\.)layer\d+\.\d+\.conv\.0\.net\.conv\.", k) for k in keys):
        return "MobileNetV2TSM"
    if any(re.search(r"(^|\.)stage\d+(\.\d+)?\.net\.", k) for k in keys):
        return "MobileOneTSM"
    return None


def detect_mmaction(state: StateDict) -> tuple[CheckpointLayout, StateDict] | None:
    """MMAction2's TSM backbones, inside a recognizer (``backbone.*``) or alone."""
    arch = _mmaction_arch(state)
    if arch is None:
        return None
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
    out, shifts, pools = drop_wrappers(state)
    out, non_local = _unwrap_non_local(out)
    extras = [f"{len(shifts)} shifted modules"]
    renames: tuple[Callable[[str], str], ...] = ()
    if arch == "ResNetTSM":
        depth = _resnet_depth(out, prefix)
        arch = f"ResNetTSM (depth {depth})" if depth else arch
        renames = (mm_to_tv_resnet,)
    if non_local:
        extras.append(f"non-local blocks after {', '.join(non_local)}")
    if pools:
        extras.append(f"temporal pool on {', '.join(pools)}")
    if any(k.startswith("neck.") for k in out):
        extras.append("a TPN neck")
    head = "cls_head.fc_cls" if "cls_head.fc_cls.weight" in out else None
    kind = "recognizer" if prefix else "backbone"
    desc = f"MMAction2 {arch} {kind}, {', '.join(extras)}{_classes(out, head)}"
    return CheckpointLayout("mmaction2", arch, desc, tuple(shifts), head, renames), out


def _unwrap_non_local(state: StateDict) -> tuple[StateDict, list[str]]:
    """``NL3DWrapper(block)``: ``layerK.i.block.*`` back to ``layerK.i.*``.

    The wrapper's ``non_local_block.*`` keys are kept where they are: the surgery equivalent
    inserts its non-local module under that same name.
    """
    wrapped = sorted({m.group(1) for k in state if (m := re.match(r"(.*layer\d+\.\d+)\.non_local_block\.", k))})
    if not wrapped:
        return state, []
    pattern = re.compile(r"^(" + "|".join(re.escape(w) for w in wrapped) + r")\.block\.")
    return {pattern.sub(r"\1.", k): v for k, v in state.items()}, wrapped


DETECTORS = (detect_paper, detect_paper_online, detect_mmaction)

"""Which models a sweep runs: one per family, names matching globs, or every timm name under a size limit."""

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["FAMILY_KINDS", "ModelSpec", "sweep_specs", "all_timm_specs", "count_params", "smallest"]

# timm model module -> "cnn" or "transformer" (transformers and conv/attention hybrids). A
# family counts as convolutional when its smallest model mixes tokens with convolutions only
# (pooling, shifts and gating count as convolutional); anything with attention, token mixing
# MLPs or recurrent token mixing is "transformer".
FAMILY_KINDS: dict[str, str] = {
    **dict.fromkeys([
        "byobnet", "convmixer", "convnext", "cpubone", "cspnet", "cspnext", "densenet", "dla", "dpn",
        "efficientnet", "fasternet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next",
        "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2", "mambaout", "mobilenetv3",
        "nasnet", "nfnet", "pnasnet", "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest",
        "resnet", "resnetv2", "rexnet", "selecsls", "senet", "sknet", "starnet", "tresnet", "vgg",
        "vovnet", "xception", "xception_aligned",
        # torchvision
        "tv.alexnet", "tv.convnext", "tv.densenet", "tv.efficientnet", "tv.googlenet", "tv.inception",
        "tv.mnasnet", "tv.mobilenetv2", "tv.mobilenetv3", "tv.regnet", "tv.resnet", "tv.shufflenetv2",
        "tv.squeezenet", "tv.vgg",
    ], "cnn"),
    **dict.fromkeys([
        "beit", "byoanet", "cait", "coat", "convit", "crossvit", "csatv2", "davit", "deepseek_vit", "deit",
        "edgenext", "efficientformer", "efficientformer_v2", "efficientvim", "efficientvit_mit",
        "efficientvit_msra", "eva", "fastvit", "focalnet", "gcvit", "gemma4_vit", "hiera", "hieradet_sam2",
        "iformer", "levit", "lowformer", "maxxvit", "metaformer", "mlp_mixer", "mobilenetv5", "mobilevit",
        "mvitv2", "naflexvit", "nest", "nextvit", "pit", "pvt_v2", "qwen3_vit", "sequencer", "shvit",
        "swiftformer", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "tiny_vit",
        "tnt", "twins", "visformer", "vision_transformer", "vision_transformer_hybrid",
        "vision_transformer_relpos", "vision_transformer_sam", "vitamin", "volo", "xcit",
        # torchvision
        "tv.maxvit", "tv.swin_transformer", "tv.vision_transformer",
    ], "transformer"),
}

# Size words in model names, smallest first; used to pick candidates for "smallest of a family".
_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxxs", "xxs", "tiny", "xs", "t", "mini", "small", "s",
               "medium", "m", "base", "b", "large", "l", "xl", "huge", "h", "giant", "g"]


@dataclass(frozen=True)
class ModelSpec:
    """One model of the sweep.

    Attributes:
        source: ``"timm"`` or ``"torchvision"``.
        family: timm's model module (``"resnet"``) or ``"tv.<module>"`` for torchvision.
        candidates: model names; the check runs the one with the fewest parameters.
    """

    source: str
    family: str
    candidates: tuple[str, ...]

    @property
    def kind(self) -> str:
        return FAMILY_KINDS.get(self.family, "unknown")

    @property
    def label(self) -> str:
        return self.candidates[0] if len(self.candidates) == 1 else f"{self.family} (smallest)"


def count_params(source: str, name: str) -> int:
    """Parameter count of a model, built on the meta device (no memory, no weights)."""
    import torch

    from tsm_surgery.integrations.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(f"{source}:{name}")
    except NotImplementedError:  # an __init__ that copies data (torchvision's RegNet) needs real tensors
        model = build_model(f"{source}:{name}")
    return sum(p.numel() for p in model.parameters())


def smallest(spec: ModelSpec) -> str:
    """The candidate with the fewest parameters (the first one if none can be built)."""
    if len(spec.candidates) == 1:
        return spec.candidates[0]
    sizes = []
    for name in spec.candidates:
        try:
            sizes.append((count_params(spec.source, name), name))
        except Exception:  # a candidate that cannot be built is simply not a candidate
            continue
    return min(sizes)[1] if sizes else spec.candidates[0]


def _size_rank(name: str) -> tuple[int, int, str]:
    tokens = re.split(r"[_\-.]", name.lower())
    ranks = [_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS]
    digits = [int(d) for d in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else len(_SIZE_WORDS) // 2, min(digits) if digits else 0, name)


def _by_size(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(names, key=lambda n: (_size_rank(n), len(n)))[:6])


def timm_family(name: str) -> str:
    """timm's model module of ``name`` (``"resnet18"`` -> ``"resnet"``)."""
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _timm_family_specs() -> list[ModelSpec]:
    import timm

    specs = []
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if not n.startswith("test_")]
        if names:
            specs.append(ModelSpec("timm", module, _by_size(names)))
    return specs


def _tv_family(name: str) -> str:
    import torchvision

    module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    return "tv." + (module.replace("_", "") if module in ("mobilenetv2", "mobilenetv3", "shufflenetv2") else module)


def _tv_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _tv_family_specs() -> list[ModelSpec]:
    families: dict[str, list[str]] = {}
    for name in _tv_names():
        families.setdefault(_tv_family(name), []).append(name)
    return [ModelSpec("torchvision", fam, _by_size(names)) for fam, names in sorted(families.items())]


def sweep_specs(models: str | None = None, limit: int | None = None) -> list[ModelSpec]:
    """The sweep: the smallest model per family, or every model matching a glob.

    Args:
        models: comma-separated globs over model names (``"resnet*,tv:vit_*"``; ``tv:`` selects
            torchvision names); ``None`` runs one model per family.
        limit: keep the first ``limit`` models.
    """
    if models is None:
        specs = _timm_family_specs() + _tv_family_specs()
    else:
        import timm

        specs = []
        for pattern in (p.strip() for p in models.split(",")):
            if pattern.startswith(("tv:", "torchvision:")):
                glob = pattern.split(":", 1)[1]
                names = [n for n in _tv_names() if fnmatch.fnmatchcase(n, glob)]
                specs += [ModelSpec("torchvision", _tv_family(n), (n,)) for n in names]
            else:
                specs += [ModelSpec("timm", timm_family(n), (n,)) for n in timm.list_models(pattern)]
    return specs[:limit] if limit else specs


def all_timm_specs(max_params: float, sizes: dict[str, int | None], names: list[str] | None = None,
                   progress: Callable[[str], None] = lambda line: None) -> list[ModelSpec]:
    """Every timm model name with at most ``max_params`` parameters, smallest first.

    Smallest first, so that a sweep stopped early has covered every name up to some size.

    Args:
        max_params: the parameter limit (a count, not millions).
        sizes: name -> parameter count (``None``: cannot be built); read as a cache and filled
            in for the names it lacks, so a resumed sweep does not count again.
        names: the names to consider (default: every name timm lists).
        progress: called with a line every 100 names counted.
    """
    if names is None:
        import timm

        names = timm.list_models()
    todo = [n for n in names if n not in sizes]
    for i, name in enumerate(todo, 1):
        try:
            sizes[name] = count_params("timm", name)
        except Exception:  # reported by the check itself, which builds it for real
            sizes[name] = None
        if i % 100 == 0:
            progress(f"counted parameters of {i}/{len(todo)} names")
    chosen = [n for n in names if sizes[n] is None or sizes[n] <= max_params]
    chosen.sort(key=lambda n: (sizes[n] is None, sizes[n] or 0, n))  # unbuildable ones last
    return [ModelSpec("timm", timm_family(n), (n,)) for n in chosen]

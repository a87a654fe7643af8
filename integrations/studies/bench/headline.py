"""The headline figures of a run and the one :data:`TARGETS` table that judges them.

Each :class:`Figure` is a row of the report's headline table (ours, the peers, the A/A
control); each :class:`Target` names the figure it judges, and the same entry writes the
headline's target column and the verdict row, so a limit is written once.

Example:
    >>> verdict(1.01, 1.02), verdict(1.04, 1.02, noise=0.03)[:12], verdict(1.06, 1.02, noise=0.03)
    ('holds', 'within noise', 'missed')
"""

from dataclasses import dataclass, field

from .measure import CONTROL
from .running import BenchResult

__all__ = ["Figure", "Target", "TARGETS", "COLUMNS", "figures", "verdict", "judge"]

COLUMNS = ("ours", "mmaction", "zero-fill", CONTROL)  # the headline's value columns, in order


@dataclass(frozen=True)
class Target:
    """A limit on one headline figure.

    Attributes:
        figure: the :class:`Figure` key it judges (ours' value).
        short: the text in the headline's target column.
        name: the verdict row's text.
        limit: ours must be at most this; unused when ``against`` is set.
        against: a column ours must stay below instead (``"mmaction"``).
    """

    figure: str
    short: str
    name: str
    limit: float | None = None
    against: str | None = None


TARGETS: tuple[Target, ...] = (
    Target("op_eager", "<= 1%", "op-level shift cost <= 1%, eager", limit=0.01),
    Target("op_compiled", "<= 0.3%", "op-level shift cost <= 0.3%, torch.compile", limit=0.003),
    Target("op_in_place_vs_clone", "<= 0.75x", "eval's in-place shift <= 0.75x a `clone` of the site inputs",
           limit=0.75),
    Target("op_compiled_vs_clone", "<= 1.00x", "compiled shift <= a compiled `clone` of the site inputs", limit=1.0),
    # a conv consumer saves 2 tensors (input, weight), a LayerNorm 5 (input, weight, bias, mean, rstd)
    Target("packs", "<= 5 per site", "tensors packed through Python per training step <= 5 per site", limit=5.0),
    Target("eval", "<= 1.02x", "eval <= 1.02x 2D", limit=1.02),
    Target("eval", "below mmaction", "eval below mmaction", against="mmaction"),
    Target("train", "<= 1.02x", "training step <= 1.02x 2D", limit=1.02),
    Target("train", "below mmaction", "training step below mmaction", against="mmaction"),
    Target("eval_compiled", "<= 1.02x", "compiled eval <= 1.02x compiled 2D", limit=1.02),
    Target("memory", "<= 1.03x", "peak training memory <= 1.03x", limit=1.03),
    Target("online", "<= 1.02x", "online step <= 1.02x 2D frame", limit=1.02),
    Target("convert", "< 2 s", "convert() < 2 s", limit=2.0),
)


@dataclass
class Figure:
    """One headline row: the text of each column and the numbers the targets judge."""

    key: str
    label: str
    cells: dict[str, str]
    values: dict[str, float | None] = field(default_factory=dict)
    noise: float | None = None  # the A/A control's distance from 1.00x (wall-clock ratios)
    note: str = ""  # context for the verdict row, e.g. the copy floor


def verdict(value: float | None, limit: float | None, noise: float | None = None) -> str:
    """``holds`` when ``value <= limit``; a miss smaller than the A/A noise is *within noise*."""
    if value is None or limit is None:
        return "n/a"
    if value <= limit:
        return "holds"
    if noise is not None and value - limit <= noise:
        return f"within noise (misses by {value - limit:.3f}, A/A control off by {noise:.3f})"
    return "missed"


def judge(target: Target, figure: Figure | None) -> str:
    if figure is None:
        return "n/a"
    limit = target.limit
    if target.against is not None:
        other = figure.values.get(target.against)
        limit = None if other is None else other - 1e-12
    return verdict(figure.values.get("ours"), limit, figure.noise)


def figures(r: BenchResult) -> list[Figure]:
    """The headline rows of ``r``, in report order (rows not measured in this run are left out)."""
    rows = [_fractions("op_eager", "op-level shift cost, eager (fraction of the 2D forward)",
                       {k: v / r.base_2d_s for k, v in r.op_eager.items()},
                       f"a `clone` of the site inputs: {pct(r.copy_floor_s / r.base_2d_s)}")]
    c = r.compiled
    if c is None:
        rows.append(_fractions("op_compiled", "op-level shift cost, torch.compile", {}, "not measured"))
    else:
        rows.append(_fractions("op_compiled", "op-level shift cost, torch.compile", {"ours": c.op_s / c.base_2d_s},
                               f"a compiled `clone`: {pct(c.copy_floor_s / c.base_2d_s)}"))
    rows += _floor_rows(r)
    rows += [_ratios("eval", "eval latency vs 2D", r.eval), _ratios("train", "training step vs 2D", r.train)]
    compiled_eval = "eval latency, compiled, vs compiled 2D"
    rows.append(_fractions("eval_compiled", compiled_eval, {}, "not measured") if c is None
                else _ratios("eval_compiled", compiled_eval, c.eval))
    base_mem = r.memory.get("2d")
    mem = {k: (None if v is None or not base_mem else v / base_mem) for k, v in r.memory.items()}
    rows.append(Figure("memory", "peak training memory vs 2D",
                       {k: times(mem.get(k)) for k in COLUMNS[:3]} | {CONTROL: ""}, mem))
    online = _ratios("online", "online per-frame step vs 2D single frame", r.online, own="online")
    online.cells["mmaction"] = "n/a (no online form)"
    rows.append(online)
    conv = r.convert
    rows.append(Figure("convert", f"`convert()` of {conv.spec}",
                       {"ours": f"{conv.median_s:.2f} s (min {conv.min_s:.2f} s)", "mmaction": "n/a",
                        "zero-fill": "n/a", CONTROL: ""}, {"ours": conv.median_s}))
    return rows


def _floor_rows(r: BenchResult) -> list[Figure]:
    """The shift against the copy floor (a `clone` of the site inputs) in each mode, and the packs per step."""
    rows = []
    if r.op_in_place_s is not None:
        ratio_ = r.op_in_place_s / r.copy_floor_s
        rows.append(Figure("op_in_place_vs_clone", "eval's in-place shift (slots moved and put back) vs `clone`",
                           _ours_only(times(ratio_)), {"ours": ratio_},
                           note=f"in place {pct(r.op_in_place_s / r.base_2d_s)}, "
                                f"clone {pct(r.copy_floor_s / r.base_2d_s)} of the 2D forward"))
    eager = r.op_eager.get("ours")
    if eager is not None:
        rows.append(Figure("op_eager_vs_clone", "eager shift (a new tensor: training, autograd on) vs `clone`",
                           _ours_only(times(eager / r.copy_floor_s)), {"ours": eager / r.copy_floor_s}))
    c = r.compiled
    compiled = None if c is None else c.op_s / c.copy_floor_s
    rows.append(Figure("op_compiled_vs_clone", "compiled shift vs compiled `clone`", _ours_only(times(compiled)),
                       {"ours": compiled}, note="" if c is not None else "not measured"))
    if r.packs_per_step is not None:
        per_site = r.packs_per_step / max(r.sites, 1)
        rows.append(Figure("packs", "tensors packed through Python per training step",
                           _ours_only(f"{r.packs_per_step} ({per_site:.1f} per site)"), {"ours": per_site}))
    return rows


def _ours_only(cell: str) -> dict[str, str]:
    return {"ours": cell, "mmaction": "", "zero-fill": "", CONTROL: ""}


def _fractions(key: str, label: str, values: dict[str, float], note: str) -> Figure:
    cells = {k: pct(values.get(k)) for k in COLUMNS[:3]} | {CONTROL: ""}
    return Figure(key, label, cells, dict(values), note=note)


def _ratios(key: str, label: str, paired: dict[str, dict[str, float]], own: str = "ours") -> Figure:
    """A wall-clock row; ``own`` is the entry that stands in the ours column."""
    entries = {k: paired.get(k) for k in COLUMNS} | {"ours": paired.get(own)}
    control = paired.get(CONTROL)
    return Figure(key, label, {k: ratio(v) for k, v in entries.items()},
                  {k: (None if v is None else v["ratio"]) for k, v in entries.items()},
                  noise=None if control is None else abs(control["ratio"] - 1.0))


def ratio(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['ratio']:.3f}x ({entry['ratio_p25']:.3f}-{entry['ratio_p75']:.3f})"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.1f} MiB"

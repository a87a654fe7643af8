"""The outputs of ``tsm-surgery ablate``: ``ablation.json``, ``ablation.md`` and ``ablation.png``.

Every number in the table comes from the rows of ``ablation.json``: :func:`summarize` reads
the saved points once, and both :func:`table` and :func:`plot` draw from its result.
"""

import json
import statistics
from fractions import Fraction
from pathlib import Path

__all__ = ["OUTPUTS", "summarize", "table", "plot", "write_outputs"]

OUTPUTS = ("ablation.json", "ablation.md", "ablation.png")


def proportion(div: int) -> str:
    """Shifted share of the channels in total (both directions) for ``shift_div``: 8 -> ``'1/4'``."""
    return str(Fraction(2, div)) if div else "0"


def _accuracy(points: list[dict]) -> dict:
    errors = [p["error"] for p in points if "error" in p]
    if errors:
        return {"error": errors[0]}
    top1 = [p["top1"] for p in points]
    if not top1:
        return {}
    return {"top1": top1, "top1_mean": statistics.fmean(top1), "top1_min": min(top1), "top1_max": max(top1),
            "within_mean": statistics.fmean(p["within"] for p in points)}


def summarize(out: Path, settings: dict) -> dict:
    """Collects the saved points of a run into the rows of ``ablation.json``."""
    points = out / "points"
    latency = json.loads((points / "latency.json").read_text()) if (points / "latency.json").is_file() else None

    def acc(place: str, div: int) -> dict:
        files = [points / f"acc_{place}_{div}_seed{s}.json" for s in range(settings["seeds"])]
        return _accuracy([json.loads(f.read_text()) for f in files if f.is_file()])

    rows = [{"proportion": "0", "shift_div": None, "place": "tsn", "latency": None, "accuracy": acc("tsn", 0)}]
    for div in settings["shift_divs"]:
        for place in settings["places"]:
            lat = latency["points"].get(f"{place}/{div}") if latency else None
            rows.append({"proportion": proportion(div), "shift_div": div, "place": place, "latency": lat,
                         "accuracy": acc(place, div)})
    data = None
    if (out / "data" / "meta.json").is_file():
        meta = json.loads((out / "data" / "meta.json").read_text())
        data = {k: meta.get(k) for k in ("videos_per_class", "size", "frames", "motion_scale", "noise_scale",
                                         "counts")}
    return {"settings": dict(settings), "data": data,
            "latency_2d_ms": latency and latency["2d_ms"], "latency_control": latency and latency["control"],
            "latency_setup": latency and {k: latency[k] for k in ("threads", "frames", "size", "rounds")},
            "rows": rows}


def _short(error: str) -> str:
    return error.split(". Hint")[0].split("; ")[0]  # the full message stays in ablation.json


def _lat_cell(lat: dict | None) -> str:
    if not lat:
        return "not run"
    if "error" in lat:
        return _short(lat["error"])
    return f"{lat['ratio']:.3f}x ({lat['p25']:.3f}-{lat['p75']:.3f})"


def _acc_cells(acc: dict) -> list[str]:
    if not acc:
        return ["not run", ""]
    if "error" in acc:
        return [_short(acc["error"]), ""]
    seeds = ", ".join(f"{100 * v:.1f}" for v in acc["top1"])
    return [f"{100 * acc['top1_mean']:.1f}% ({seeds})", f"{100 * acc['within_mean']:.1f}%"]


def table(summary: dict) -> str:
    """The Markdown table of a summary (one row per grid point, TSN first)."""
    lines = ["| shifted (total) | shift_div | place | eval latency vs 2D (IQR) | top-1 mean (per seed) | "
             "within pair |", "|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        cells = [row["proportion"], str(row["shift_div"] or "-"), row["place"]]
        cells += ["1 (the 2D network)" if row["place"] == "tsn" else _lat_cell(row["latency"])]
        lines.append("| " + " | ".join(cells + _acc_cells(row["accuracy"])) + " |")
    control, setup, data = summary["latency_control"], summary["latency_setup"], summary["data"]
    notes = []
    if control:
        notes.append(f"A/A control (a copy of the 2D network timed like the others): {control['ratio']:.3f}x "
                     f"({control['p25']:.3f}-{control['p75']:.3f}); 2D clip forward {summary['latency_2d_ms']:.1f} ms "
                     f"({setup['frames']} frames of {setup['size']} px, {setup['threads']} thread(s), "
                     f"median of {setup['rounds']} paired rounds).")
    if data:
        notes.append(f"Accuracy: {summary['settings']['epochs']} epochs from scratch, {summary['settings']['seeds']} "
                     f"seeds, scored on the {data['counts']['val'] + data['counts']['test']} held-out val + test "
                     f"videos of the harder data (motion x{data['motion_scale']}, noise x{data['noise_scale']}); "
                     "within pair: choosing between a pair's two time-reversed classes, chance = 50%.")
    lines += [""] + notes if notes else []
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Latency overhead and accuracy against the shifted proportion, one line per placement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = ["0"] + [proportion(d) for d in summary["settings"]["shift_divs"]]
    xpos = {label: i for i, label in enumerate(labels)}
    fig, (ax_lat, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    control = summary["latency_control"]
    if control:
        ax_lat.axhspan(100 * (control["p25"] - 1), 100 * (control["p75"] - 1), color="grey", alpha=0.25,
                       label="A/A control (IQR)")
    tsn = rows[0]["accuracy"]
    for k, place in enumerate(summary["settings"]["places"]):
        mine = [r for r in rows if r["place"] == place]
        lat = [(xpos[r["proportion"]], r["latency"]) for r in mine if r["latency"] and "error" not in r["latency"]]
        if lat:
            x = [p + 0.06 * (k - 0.5) for p, _ in lat]  # side by side, not on top of each other
            y = [100 * (v["ratio"] - 1) for _, v in lat]
            err = [[100 * (v["ratio"] - v["p25"]) for _, v in lat], [100 * (v["p75"] - v["ratio"]) for _, v in lat]]
            ax_lat.errorbar(x, y, yerr=err, marker="o", capsize=3, label=place)
        acc = [(xpos[r["proportion"]], r["accuracy"]) for r in ([rows[0]] if tsn and "error" not in tsn else []) + mine
               if r["accuracy"] and "error" not in r["accuracy"]]
        if acc:
            x = [p + 0.06 * (k - 0.5) for p, _ in acc]
            mean = [100 * a["top1_mean"] for _, a in acc]
            err = [[m - 100 * a["top1_min"] for m, (_, a) in zip(mean, acc)],
                   [100 * a["top1_max"] - m for m, (_, a) in zip(mean, acc)]]
            line = ax_acc.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=place)
            for xi, (_, a) in zip(x, acc):
                ax_acc.scatter([xi] * len(a["top1"]), [100 * v for v in a["top1"]], s=8,
                               color=line[0].get_color(), alpha=0.5, zorder=3)
        for r in mine:  # grid points that could not be built: marked, not dropped
            for ax, entry in ((ax_lat, r["latency"]), (ax_acc, r["accuracy"])):
                if entry and "error" in entry:
                    ax.annotate("x  cannot convert" if "convert" in entry["error"] else "x  failed",
                                (xpos[r["proportion"]], 0.04 + 0.08 * k), xycoords=("data", "axes fraction"),
                                color="C3", fontsize=8, ha="center")
    if not control:
        ax_lat.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax_lat.transAxes, color="grey")
    ax_lat.axhline(0, color="black", lw=0.8)
    ax_lat.set(xlabel="shifted channels (total)", ylabel="eval latency overhead vs 2D (%)",
               title="latency", xticks=range(len(labels)), xticklabels=labels, xlim=(-0.5, len(labels) - 0.5))
    ax_acc.set(xlabel="shifted channels (total); 0 = TSN", ylabel="top-1 (%)", title="accuracy (harder data)",
               xticks=range(len(labels)), xticklabels=labels, ylim=(0, 100), xlim=(-0.5, len(labels) - 0.5))
    for ax in (ax_lat, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"tsm-surgery ablate: {summary['settings']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(out: Path, settings: dict, only: str | None = None) -> dict:
    """Writes ``ablation.json``, ``ablation.md`` and ``ablation.png`` from the saved points."""
    summary = summarize(out, settings)
    (out / "ablation.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "ablation.md").write_text(table(summary) + "\n")
    plot(summary, out / "ablation.png")
    return summary

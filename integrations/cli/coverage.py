"""``tsm-surgery coverage``: the options, the two sweeps (per family, ``--all``) and their progress lines."""

import argparse
import fnmatch
import os
import sys
import time
from collections.abc import Callable

from tsm_surgery.integrations.studies.coverage.check import Result
from tsm_surgery.integrations.studies.coverage.pool import run_checks
from tsm_surgery.integrations.studies.coverage.report import Meta, Report, load_report, save_report, summarize
from tsm_surgery.integrations.studies.coverage.specs import all_timm_specs, sweep_specs

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``tsm-surgery coverage``."""
    parser.add_argument("--models", help="comma-separated globs over timm names (tv:GLOB for torchvision); "
                                         "default: the smallest model of every timm and torchvision family. "
                                         "With --all: restricts the timm names")
    parser.add_argument("--all", action="store_true", help="every timm model name up to --max-params, resumable: "
                                                            "models already in the JSON are skipped")
    parser.add_argument("--max-params", type=float, default=40.0,
                        help="--all: parameter limit in millions (default 40)")
    parser.add_argument("--limit", type=int, help="run only the first N models (with --all: N more models)")
    parser.add_argument("--out", help="markdown report (default docs/COVERAGE.md, docs/COVERAGE_ALL.md with --all); "
                                      "the JSON goes next to it with a .json suffix")
    parser.add_argument("--json", help="JSON results path (default: --out with .json)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / jobs)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per model before it is killed (default 300)")
    parser.add_argument("--frames", type=int, default=4, help="clip length T of the checks (default 4, at least 3)")


class _Progress:
    """``[done/total] model (family, 3.2 s): status, ETA 12 min`` lines."""

    def __init__(self, total: int, jobs: int, say: Callable[[str], None]):
        self.total, self.jobs, self.say = total, max(1, jobs), say
        self.done, self.start = 0, time.perf_counter()

    def __call__(self, r: Result) -> None:
        self.done += 1
        per_model = (time.perf_counter() - self.start) / self.done
        eta = per_model * (self.total - self.done) / 60
        status = r.status if r.status != "fail" else f"FAIL at {r.failed_at}: {r.reason}"
        if r.status == "partial":
            status += f" ({r.blocks.describe()})"
        self.say(f"[{self.done}/{self.total}] {r.model} ({r.family}, {r.seconds:.1f} s): {status}; ETA {eta:.0f} min")


def _print(line: str) -> None:
    print(line, flush=True)


def _paths(args: argparse.Namespace) -> tuple:
    out = args.out or ("docs/COVERAGE_ALL.md" if args.all else "docs/COVERAGE.md")
    return out, args.json or os.path.splitext(out)[0] + ".json"


def _family_sweep(args: argparse.Namespace) -> Report:
    specs = sweep_specs(args.models, args.limit)
    if not specs:
        raise ValueError(f"no model matches {args.models!r}; `timm.list_models('GLOB')` shows what a glob selects")
    selection = ("smallest model of every timm family and torchvision classification family"
                 if args.models is None else f"models matching {args.models!r}")
    meta = Meta(selection, args.frames, args.jobs, args.timeout, versions=Meta.library_versions())
    _print(f"coverage: {len(specs)} models, {args.jobs} worker(s), {args.timeout:.0f} s each at most")
    start, progress = time.perf_counter(), _Progress(len(specs), args.jobs, _print)
    results: list[Result | None] = [None] * len(specs)
    for position, result in run_checks(specs, args.jobs, args.timeout, args.frames, args.threads):
        results[position] = result
        progress(result)
    meta.wall_s = round(time.perf_counter() - start, 1)
    return Report(meta, results)


def _timm_names(models: str | None) -> list[str]:
    import timm

    names = timm.list_models()
    if models is None:
        return names
    globs = [g.strip() for g in models.split(",")]
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def _all_sweep(args: argparse.Namespace, out: str, json_path: str) -> Report:
    if os.path.exists(json_path):
        report = load_report(json_path)
        _print(f"coverage --all: resuming {json_path}: {len(report.results)} models done")
    else:
        selection = "every timm model name" + (f" matching {args.models!r}" if args.models else "")
        report = Report(Meta(selection, args.frames, args.jobs, args.timeout), [])
    meta = report.meta
    meta.versions, meta.max_params_m = Meta.library_versions(), args.max_params
    meta.jobs, meta.timeout = args.jobs, args.timeout
    names = _timm_names(args.models)
    specs = all_timm_specs(args.max_params * 1e6, meta.sizes, names, progress=_print)
    meta.names_total, meta.names_in_limit = len(names), len(specs)
    done = {r.model for r in report.results}
    todo = [s for s in specs if s.candidates[0] not in done][: args.limit or None]
    _print(f"coverage --all: {len(specs)} of {len(names)} names have at most {args.max_params:g} M parameters; "
           f"{len(specs) - len(todo)} done or left for later, {len(todo)} to run now")
    start, wall_before, progress = time.perf_counter(), meta.wall_s, _Progress(len(todo), args.jobs, _print)
    order = {s.candidates[0]: i for i, s in enumerate(specs)}
    for _, result in run_checks(todo, args.jobs, args.timeout, args.frames, args.threads):
        report.results.append(result)
        report.results.sort(key=lambda r: order.get(r.model, len(order)))
        meta.wall_s = round(wall_before + time.perf_counter() - start, 1)
        save_report(report, json_path, out)  # after every model: a killed sweep resumes from here
        progress(result)
    return report


def run(args: argparse.Namespace) -> int:
    """Runs the sweep and writes the markdown and JSON reports."""
    if args.frames < 3:
        print("--frames must be at least 3: the online check needs 3 or more frames", file=sys.stderr)
        return 2
    out, json_path = _paths(args)
    try:
        report = _all_sweep(args, out, json_path) if args.all else _family_sweep(args)
    except ValueError as err:
        print(f"tsm-surgery coverage: {err}", file=sys.stderr)
        return 1
    save_report(report, json_path, out)
    summary = summarize(report.results)
    for kind in ("cnn", "transformer", "all"):
        s = summary[kind]
        print(f"{kind}: {s['pass']}/{s['families']} families pass, {s['partial']} partial, {s['fail']} fail "
              f"({s['models']} models: {s['models_pass']} pass, {s['models_partial']} partial)")
    print(f"wrote {out} and {json_path}")
    return 0

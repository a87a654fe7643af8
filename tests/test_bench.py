"""``tsm-surgery bench``: measuring, the targets table, the report and its sections, the CUDA refusal.

No timing is asserted: wall-clock numbers depend on the machine (the report prints them).
"""

import argparse
import ast
import os
import pathlib
import re
import time

import pytest
import torch

from tsm_surgery.integrations.cli import bench as bench_verb
from tsm_surgery.integrations.cli.bench import QUICK, add_arguments, settings_from_args
from tsm_surgery.integrations.studies import bench
from tsm_surgery.integrations.studies.bench import TARGETS, Figure, Settings, Target, merge_sections, render, run_bench
from tsm_surgery.integrations.studies.bench.headline import figures, judge, verdict

TINY = Settings(model="torchvision:resnet18", frames=4, eval_size=32, train_size=32, online_size=32, rounds=2,
                repeats=1, op_repeats=2, compile=False, profile=False, convert_model="torchvision:resnet18",
                convert_repeats=1, default_malloc=True)


@pytest.fixture(scope="module")
def tiny_result():
    return run_bench(TINY)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _section(text, title):
    """The lines of the Markdown section ``## title`` (up to the next ``## ``)."""
    body = text.split(f"## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0].splitlines()


# ------------------------------------------------------------------ measuring
def test_paired_ratios_take_ratios_within_rounds_and_keep_the_fastest_pass():
    # A clock that returns what the callable returns: the durations are known exactly.
    durations = {"2d": iter([1.0, 2.0, 9.0, 2.0, 1.0, 1.0]), "ours": iter([1.5, 3.0, 3.0, 3.0, 1.5, 9.0])}
    fns = {name: (lambda it=it: next(it)) for name, it in durations.items()}
    res = bench.paired_ratios(fns, "2d", rounds=2, warmup=1, repeats=2, clock=lambda fn: fn())
    # warm-up eats (1.0, 1.5); round 1 keeps min(2, 9)=2 and min(3, 3)=3; round 2 min(2, 1)=1 and min(3, 1.5)=1.5
    assert res["2d"]["ratio"] == 1.0
    assert res["ours"]["ratio"] == pytest.approx(1.5) and res["ours"]["min_s"] == 1.5
    assert res["ours"]["median_s"] == pytest.approx(2.25)


def test_interleaved_minima_time_each_call_after_an_untimed_one_in_turns():
    calls = []
    durations = {"a": iter([9.0, 4.0, 9.0, 2.0]), "b": iter([9.0, 3.0, 9.0, 5.0])}
    fns = {name: (lambda name=name, it=it: calls.append(name) or next(it)) for name, it in durations.items()}
    best = bench.interleaved_min_times(fns, repeats=2, clock=lambda fn: fn())
    # each turn: an untimed call (9.0) then the timed one; the minimum over the timed calls
    assert best == {"a": 2.0, "b": 3.0}
    assert calls[:2] in (["a", "a"], ["b", "b"]) and sorted(calls) == ["a"] * 4 + ["b"] * 4


def test_a_a_control_of_identical_work_is_near_one():
    x = torch.randn(128, 128)
    res = bench.paired_ratios({"2d": lambda: x @ x, bench.CONTROL: lambda: x @ x}, "2d", rounds=5, repeats=3)
    assert res["2d"]["ratio"] == 1.0
    assert 0.2 < res[bench.CONTROL]["ratio"] < 5  # same work: noise only (the machine is shared)


def test_peak_bytes_counts_held_tensors_and_the_largest_live_set():
    held = torch.zeros(1000, dtype=torch.uint8)

    def work():
        a = torch.ones(4000, dtype=torch.uint8)
        b = a + 1  # a and b alive together: 8000 bytes
        del a, b
        torch.ones(5000, dtype=torch.uint8)

    assert bench.peak_bytes(work, lambda: [held, held], torch.device("cpu")) == 1000 + 8000


def test_peak_bytes_lets_the_call_free_held_tensors():
    # A training step drops the old gradients first: the count must not keep them alive.
    box = {"grad": torch.zeros(1000, dtype=torch.uint8)}

    def step():
        box["grad"] = None
        box["grad"] = torch.ones(1000, dtype=torch.uint8)

    assert bench.peak_bytes(step, lambda: [box["grad"]], torch.device("cpu")) == 1000


# ------------------------------------------------------------------ targets
def test_verdicts_tell_noise_from_misses():
    assert verdict(1.01, 1.02, 0.03) == "holds"
    assert verdict(1.04, 1.02, 0.03).startswith("within noise")
    assert verdict(1.06, 1.02, 0.03) == "missed"
    assert verdict(0.012, 0.01) == "missed"
    assert verdict(None, 1.02) == "n/a"


def test_below_a_peer_uses_the_peer_as_the_limit():
    target = Target("eval", "below mmaction", "eval below mmaction", against="mmaction")
    fig = Figure("eval", "eval", {}, {"ours": 1.04, "mmaction": 1.05}, noise=0.0)
    assert judge(target, fig) == "holds"
    fig.values["mmaction"] = 1.03
    assert judge(target, fig) == "missed"
    fig.values["mmaction"] = None  # no peer in this run
    assert judge(target, fig) == "n/a"


def test_one_targets_table_drives_the_headline_and_the_verdicts(tiny_result):
    text = render(tiny_result)
    headline, verdicts = _section(text, "Headline"), _section(text, "Targets")
    rows = {fig.key: fig for fig in figures(tiny_result)}
    for target in TARGETS:
        line = next(line for line in headline if line.startswith(f"| {rows[target.figure].label} |"))
        assert target.short in line.rsplit("|", 2)[1], (target, line)
        verdict_line = next(line for line in verdicts if line.startswith(f"| {target.name}"))
        assert verdict_line.rstrip(" |").endswith(judge(target, rows[target.figure]))
    # Every target's figure has a row, measured or not.
    assert {t.figure for t in TARGETS} <= {f.key for f in figures(tiny_result)}


def test_report_describes_the_machine_it_ran_on(tiny_result):
    text = render(tiny_result)
    setup = "\n".join(_section(text, "Setup"))
    cpu = tiny_result.machine.cpu
    if os.path.exists("/proc/cpuinfo"):
        names = re.findall(r"^model name\s*:\s*(.*)$", pathlib.Path("/proc/cpuinfo").read_text(), re.M)
        assert not names or cpu == names[0].strip()
    assert cpu in setup and f"{os.cpu_count()} logical CPUs" in setup
    assert f"{torch.get_num_threads()} threads" in setup and "load average" in setup
    assert "2-core" not in text


@pytest.mark.parametrize("load_end, own, busy", [(1.9, 1.9, False), (3.8, 1.9, True), (1.9, 0.0, True)])
def test_busy_text_takes_the_runs_own_threads_off_the_load(load_end, own, busy):
    machine = bench.machine.describe(torch.device("cpu"))
    machine.usable_cpus, machine.load_start, machine.load_end, machine.own_load = 2, (0.1,) * 3, (load_end,) * 3, own
    text = machine.busy_text()
    assert text.startswith("the host was busy") == busy, text
    assert f"load {max(load_end - own, 0.1):.1f} " in text


def test_finish_measures_the_runs_own_load():
    # A sleeping run uses no CPU; a busy one uses up to one CPU (less when the host is shared:
    # the bounds only need to tell the two apart).
    machine = bench.machine.describe(torch.device("cpu"))
    time.sleep(0.2)
    machine.finish()
    assert 0 <= machine.own_load < 0.15
    machine = bench.machine.describe(torch.device("cpu"))
    deadline = machine._started[0] + 0.3
    while time.perf_counter() < deadline:  # one thread busy
        pass
    machine.finish()
    assert 0.25 < machine.own_load < 1.5


def test_result_numbers_are_consistent(tiny_result):
    r = tiny_result
    assert r.batch == TINY.frames * TINY.clips and r.sites == 8  # torchvision ResNet-18: 8 blocks
    assert r.agreement["zero-fill"] == 0.0  # the paper's zero-fill shift computes the same numbers
    assert r.shift_effect > 0.01  # ... and the shift changes the 2D output
    assert r.packs_per_step == 0  # each branch starts with a conv: shift and conv are one autograd unit
    assert r.op_in_place_s is not None and r.op_in_place_s > 0 and r.copy_floor_s > 0
    assert set(r.eval) == {"2d", bench.CONTROL, "ours", "zero-fill"} and r.eval["2d"]["ratio"] == 1.0
    # At 32 px parameters and gradients dominate the peak: they count from the start.
    import torchvision

    params = sum(p.numel() for p in torchvision.models.resnet18().parameters())
    assert 1.5 * 4 * params < r.memory["2d"] < 3 * 4 * params
    assert r.memory["ours"] <= 1.03 * r.memory["2d"]
    assert r.online["online"]["median_s"] > 0 and r.throughput is None and r.compiled is None


# ------------------------------------------------------------------ the command
def test_quick_fills_only_the_flags_not_given():
    s = settings_from_args(_args("--quick", "--frames", "6"))
    assert s.frames == 6 and s.model == QUICK["model"] and s.rounds == QUICK["rounds"] and not s.compile
    assert settings_from_args(_args()).compile and settings_from_args(_args("--quick", "--compile")).compile
    assert settings_from_args(_args("--amp")).dtype == "bf16"
    assert settings_from_args(_args("--amp", "--device", "cuda")).dtype == "fp16"
    assert settings_from_args(_args("--amp", "--dtype", "bf16", "--device", "cuda")).dtype == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_bench_refuses_clearly_without_cuda(tmp_path, capsys):
    from tsm_surgery.cli import main

    out = tmp_path / "BENCH.md"
    with pytest.raises(ValueError, match=r"--device cuda: no CUDA device is available .*Hint"):
        bench_verb.run(_args("--device", "cuda", "--quick", "--output", str(out)))
    assert main(["bench", "--device", "cuda", "--quick", "--output", str(out)]) == 1
    assert "tsm-surgery bench: --device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not out.exists()


def test_quick_bench_writes_its_section_and_keeps_the_gpu_one(tmp_path):
    from tsm_surgery.cli import main

    out = tmp_path / "BENCH.md"
    gpu = "## GPU: Some GPU\n\nmeasured elsewhere\n"
    out.write_text(merge_sections("", "cuda", gpu))
    assert main(["bench", "--quick", "--default-malloc", "--output", str(out)]) == 0
    text = out.read_text()
    for needle in ("op-level shift cost", "eval latency vs 2D", "training step vs 2D", "peak training memory",
                   "online per-frame step", "convert()", "threads", "float32", "## Page faults", "A/A control"):
        assert needle in text, needle
    assert re.search(r"\d\.\d{3}x \(\d\.\d{3}-\d\.\d{3}\)", text)  # ratios with their interquartile range
    assert text.index("<!-- bench:cpu -->") < text.index("<!-- bench:cuda -->")
    assert gpu in text  # the other device's section is kept as it was


def test_sections_replace_their_own_and_adopt_an_old_report():
    old = "# Benchmarks\n\nan old report without sections\n"
    text = merge_sections(old, "cuda", "## GPU: A\n")
    assert text.startswith("<!-- bench:cpu -->\n# Benchmarks") and "## GPU: A\n" in text
    text = merge_sections(text, "cuda", "## GPU: B\n")
    assert "## GPU: A" not in text and "## GPU: B\n" in text and "an old report" in text
    text = merge_sections(text, "cpu", "# Benchmarks\n\nnew\n")
    assert "an old report" not in text and "## GPU: B\n" in text and text.count("<!-- bench:") == 2


def test_every_section_key_survives_another_sections_write():
    """A key with a hyphen is a section too: writing "deploy" once dropped "deploy-accuracy" as old text."""
    text = merge_sections("", "cpu", "# Benchmarks\n")
    text = merge_sections(text, "deploy-accuracy", "## Deploy accuracy\n")
    text = merge_sections(text, "deploy", "## Deploy\n")
    assert "## Deploy accuracy\n" in text and text.count("<!-- bench:") == 3
    text = merge_sections(text, "deploy-accuracy", "## Deploy accuracy, again\n")
    assert "## Deploy accuracy\n" not in text and "again" in text and text.count("<!-- bench:") == 3


def test_bench_uses_only_the_public_core_api():
    root = pathlib.Path(bench.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsm_surgery"):
                assert not any(part.startswith("_") for part in node.module.split(".")), (path.name, node.module)
                assert not any(alias.name.startswith("_") for alias in node.names), (path.name, node.module)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tsm_surgery":
                assert not node.attr.startswith("_"), (path.name, node.attr)


@pytest.mark.parametrize("name", ["measure", "peers", "headline", "report", "machine"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"tsm_surgery.integrations.studies.bench.{name}")
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0

"""Deployment: each CPU runtime (onnxruntime, OpenVINO, ExecuTorch) runs the exported online step with
its caches fed back equal to PyTorch's offline uni network frame by frame, and the clip network equal
to PyTorch; every exported graph is rank <= 4 without ScatterND; bad input fails in one line and
writes nothing."""

import json
import sys

import numpy as np
import pytest
import torch
from utils import randomize_norms

import tsm_surgery
from tsm_surgery.integrations.export import export_set, load
from tsm_surgery.integrations.export.artifacts import torch_export
from tsm_surgery.integrations.models import build_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SIZE = 32
FRAME = (3, SIZE, SIZE)
SEGMENTS = 4
RTOL = 1e-4  # runtimes fuse conv + BN and reorder sums: float32 rounding
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte"}
MBV2, R18 = "timm:mobilenetv2_100", "timm:resnet18"
# Lowering to XNNPACK takes about a minute per network on two busy cores; OpenVINO about 20 s.
SLOW = pytest.mark.slow


def _needs(target):
    if target == "openvino":
        pytest.importorskip("openvino")
    elif target == "executorch":
        pytest.importorskip("executorch.runtime")


def _model(spec):
    torch.manual_seed(0)
    return randomize_norms(build_model(spec, num_classes=6)).eval()


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(target, form, spec) -> (sidecar path, PyTorch offline uni network), exported once per module."""
    cache = {}

    def get(target, form, spec):
        _needs(target)
        key = (target, form, spec)
        if key not in cache:
            model = _model(spec)
            offline = tsm_surgery.convert(model, n_segments=SEGMENTS, direction="uni").eval()
            network = tsm_surgery.to_online(tsm_surgery.convert(model, n_segments=SEGMENTS, direction="uni"),
                                            frame_shape=FRAME) if form == "online" else offline
            path = tmp_path_factory.mktemp(f"{target}_{form}") / f"net{SUFFIX[target]}"
            kwargs = {"exporter": "legacy"} if target == "onnx" else {}
            export_set(target, network, str(path), frame_shape=FRAME, **kwargs)
            cache[key] = (path.with_suffix(".json"), offline)
        return cache[key]

    return get


CASES = [
    ("onnx", MBV2), ("onnx", R18), ("openvino", MBV2), pytest.param("openvino", R18, marks=SLOW),
    pytest.param("executorch", MBV2, marks=SLOW), pytest.param("executorch", R18, marks=SLOW),
]


@pytest.mark.parametrize("target,spec", CASES)
@torch.no_grad()
def test_online_stream_equals_offline_uni_frame_by_frame(exported, target, spec):
    sidecar, offline = exported(target, "online", spec)
    runner = load(str(sidecar))
    # OpenVINO's step is the folded form (every site of these models starts with a conv), the others the concat form
    assert len(runner.sidecar.get("folded_sites", [])) == (len(runner.sidecar["sites"]) if target == "openvino" else 0)
    clip = torch.randn(2 * SEGMENTS, *FRAME)
    expected = offline(clip[:SEGMENTS])
    # The shift really mixes frames: frame 1's output differs from the frame seen alone.
    assert _rel(offline(clip[1:2].repeat(SEGMENTS, 1, 1, 1))[0], expected[1]) > 100 * RTOL
    for _ in range(2):  # reset starts the stream again
        runner.reset()
        got = torch.cat([runner.step(clip[t:t + 1]) for t in range(SEGMENTS)])
        assert _rel(got, expected) <= RTOL
    # the stateless form: the caller owns the caches, here of two streams (chunks of the artifact's batch 1)
    engine = runner.step_engine()
    state = engine.init_state(2)
    second = offline(clip[SEGMENTS:])
    for t in range(SEGMENTS):
        logits, state = engine.step(torch.stack([clip[t], clip[SEGMENTS + t]]), state)
        assert _rel(logits[:1], expected[t:t + 1]) <= RTOL and _rel(logits[1:], second[t:t + 1]) <= RTOL


@pytest.mark.parametrize("target", ["onnx", "openvino", pytest.param("executorch", marks=SLOW)])
@torch.no_grad()
def test_clip_network_equals_pytorch(exported, target):
    sidecar, offline = exported(target, "offline", R18)
    runner = load(str(sidecar))
    for clips in (1, 3):
        x = torch.randn(clips * SEGMENTS, *FRAME)
        assert _rel(runner.run(x), offline(x)) <= RTOL


@torch.no_grad()
def test_openvino_bf16_is_a_precision_of_its_own(exported):
    """bf16 runs (on this CPU's bfloat16 units, or emulated) and is measurably off float32: never the default."""
    sidecar, offline = exported("openvino", "online", MBV2)
    f32, bf16 = load(str(sidecar)), load(str(sidecar), precision="bf16")
    clip = torch.randn(SEGMENTS, *FRAME)
    expected = offline(clip)
    assert _rel(torch.cat([f32.step(clip[t:t + 1]) for t in range(SEGMENTS)]), expected) <= RTOL
    # bfloat16 keeps 8 bits of mantissa: within a few per cent where the CPU has bf16 units, exact where not
    assert _rel(torch.cat([bf16.step(clip[t:t + 1]) for t in range(SEGMENTS)]), expected) < 0.5


# --- rank 4 and no ScatterND, in every exported graph ---------------------------------------------

def _networks(form, spec=MBV2):
    """What a target exports for ``form`` (``online``: the step; ``folded``: OpenVINO's step) and its args."""
    model = _model(spec)
    net = tsm_surgery.convert(model, n_segments=SEGMENTS, direction="uni").eval()
    if form == "offline":
        return net, (torch.zeros(SEGMENTS, *FRAME),)
    online = tsm_surgery.to_online(net, frame_shape=FRAME)
    state = online.init_state(1, frame_shape=FRAME)
    step = online.folded_step_module() if form == "folded" else online.step_module
    return step, (torch.zeros(1, *FRAME), *state.values())


def _onnx_ranks(module, args, path, exporter):
    import onnx

    from tsm_surgery.integrations.export.onnx import write

    names = [f"in_{i}" for i in range(len(args))]
    write(module, args, str(path), names, ["output"], exporter=exporter)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values}
    ops = {n.op_type for n in model.graph.node}
    assert len(ranks) > len(model.graph.node) // 2  # shape inference reached the graph
    return ranks, ops


def _openvino_ranks(module, args):
    ov = pytest.importorskip("openvino")
    model = ov.convert_model(torch_export(module, args))
    ranks, ops = {}, set()
    for op in model.get_ops():
        ops.add(op.get_type_name())
        if op.get_type_name() == "Constant":
            continue  # weights: a grouped convolution's are (groups, out, in, kh, kw) in OpenVINO's opset
        for i, out in enumerate(op.outputs()):
            ranks[f"{op.get_friendly_name()}:{i}"] = out.get_partial_shape().rank.get_length()
    return ranks, ops


def _program_ranks(module, args):
    program = torch_export(module, args)
    ranks, ops = {}, set()
    for node in program.graph.nodes:
        ops.add(str(node.target))
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            ranks[node.name] = value.dim()
    return ranks, ops


def _assert_rank4(ranks, ops):
    assert ranks, "no values found"
    high = {name: r for name, r in ranks.items() if r > 4}
    assert not high, f"{len(high)} values of rank > 4, e.g. {sorted(high.items())[:5]}"
    scatter = {op for op in ops if "scatter" in op.lower() or "index_put" in op.lower()}
    assert not scatter, scatter


@pytest.mark.parametrize("form", ["online", "offline"])
@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=SLOW)])
def test_onnx_graphs_are_rank4_without_scatter(tmp_path, form, exporter):
    module, args = _networks(form)
    _assert_rank4(*_onnx_ranks(module, args, tmp_path / "g.onnx", exporter))


@pytest.mark.parametrize("form", ["folded", "offline"])
def test_openvino_graphs_are_rank4_without_scatter(form):
    _assert_rank4(*_openvino_ranks(*_networks(form)))


@pytest.mark.parametrize("form", ["online", "offline"])
def test_executorch_programs_are_rank4_without_scatter(form):
    pytest.importorskip("executorch.exir")
    _assert_rank4(*_program_ranks(*_networks(form)))


def test_executorch_serialises_with_the_default_sigchld_and_puts_the_callers_handler_back(tmp_path):
    """A DataLoader with workers leaves a Python SIGCHLD handler installed; with it, a child of an
    ExecuTorch export exiting crashed the process (SIGSEGV) in the slow suite. The writer runs the
    whole export with the default action and restores the caller's handler."""
    import signal
    import subprocess

    pytest.importorskip("executorch.exir")
    from tsm_surgery.integrations.export import executorch

    calls = []
    previous = signal.signal(signal.SIGCHLD, lambda *_: calls.append(1))
    try:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        assert calls, "the handler should see a child's exit outside the writer"
        calls.clear()
        with executorch.default_sigchld():
            assert signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        executorch.write(torch.nn.Conv2d(3, 4, 1).eval(), (torch.randn(1, 3, 4, 4),), str(tmp_path / "c.pte"))
        assert not calls and (tmp_path / "c.pte").stat().st_size > 0
        assert signal.getsignal(signal.SIGCHLD) is not signal.SIG_DFL  # the caller's handler is back
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        assert calls
    finally:
        signal.signal(signal.SIGCHLD, previous)


# --- bad input: one line, nothing written --------------------------------------------------------

def _one_line_error(capsys, argv):
    from tsm_surgery.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tsm-surgery {argv[0]}: ")
    return err


@pytest.mark.parametrize("target", ["openvino", "executorch"])
def test_bi_network_refused_online(tmp_path, capsys, target):
    err = _one_line_error(capsys, ["export", "--target", target, "--model", R18, "--online", "--direction", "bi",
                                   "--size", "32", "--output", str(tmp_path / f"x{SUFFIX[target]}")])
    assert "uni" in err and "--offline" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target,module", [("openvino", "openvino"), ("executorch", "executorch.exir")])
def test_missing_runtime_names_the_extra(tmp_path, capsys, monkeypatch, target, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    err = _one_line_error(capsys, ["export", "--target", target, "--model", R18, "--size", "32",
                                   "--output", str(tmp_path / f"x{SUFFIX[target]}")])
    assert "pip install 'tsm_surgery[deploy]'" in err and module.split(".")[0] in err
    assert list(tmp_path.iterdir()) == []
    # the library call says the same and writes nothing either
    online = tsm_surgery.to_online(tsm_surgery.convert(_model(R18), n_segments=SEGMENTS, direction="uni"))
    with pytest.raises(ImportError, match=r"tsm_surgery\[deploy\]"):
        export_set(target, online, str(tmp_path / f"x{SUFFIX[target]}"), frame_shape=FRAME)
    assert list(tmp_path.iterdir()) == []


def test_missing_runtime_when_loading(exported, monkeypatch):
    sidecar, _ = exported("onnx", "online", MBV2)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"tsm_surgery\[deploy\]"):
        load(str(sidecar), engine="openvino")


@pytest.mark.parametrize("target", ["onnx", "openvino", pytest.param("executorch", marks=SLOW)])
def test_sidecar_that_does_not_match_its_artifact(exported, tmp_path, target):
    sidecar, _ = exported(target, "online", MBV2)
    data = json.loads(sidecar.read_text())
    data["state"][2]["shape"][1] += 1
    data["inputs"][3]["shape"][1] += 1
    changed = sidecar.parent / "changed.json"
    changed.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cache_2.*do not belong together"):
        load(str(changed))
    data["inputs"].pop()
    changed.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="do not belong together"):
        load(str(changed))


def test_engine_of_another_target_is_refused(exported):
    sidecar, _ = exported("onnx", "online", MBV2)
    with pytest.raises(ValueError, match="--engine executorch.*onnx export"):
        load(str(sidecar), engine="executorch")


def test_a_failed_export_writes_nothing(tmp_path, monkeypatch):
    from tsm_surgery.integrations.export import onnx as onnx_target

    def half_written(module, args, path, *names, **kwargs):
        open(path, "wb").write(b"partial graph")
        open(path + ".data", "wb").write(b"partial weights")
        raise RuntimeError("exporter failed midway")

    monkeypatch.setattr(onnx_target, "write", half_written)
    online = tsm_surgery.to_online(tsm_surgery.convert(_model(R18), n_segments=SEGMENTS, direction="uni"))
    with pytest.raises(RuntimeError, match="midway"):
        export_set("onnx", online, str(tmp_path / "x.onnx"), frame_shape=FRAME)
    assert list(tmp_path.iterdir()) == []


def test_export_verb_sidecar_drives_the_runner_and_stream_batch(tmp_path, capsys):
    """The verb's sidecar drives the runner, and the runner drives the live loop's StreamBatch."""
    from tsm_surgery.cli import main

    out = tmp_path / "mbv2.xml"
    assert main(["export", "--target", "openvino", "--model", MBV2, "--num-classes", "6", "--size", "32",
                 "--output", str(out)]) == 0
    sidecar = json.loads((tmp_path / "mbv2.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbv2.bin", "mbv2.json", "mbv2.xml"]
    assert sidecar["target"] == "openvino" and sidecar["form"] == "online" and sidecar["direction"] == "uni"
    assert sidecar["inputs"][0] == {"name": "frames", "shape": [1, *FRAME], "dtype": "float32"}
    assert [s["input"] for s in sidecar["state"]] == [f"cache_{i}" for i in range(len(sidecar["sites"]))]
    assert sidecar["precision"] == "f32" and sidecar["shift_div"] == 8 and sidecar["preprocess"]["size"] == 32
    # the runner's step_engine() drives the live frame loop's StreamBatch: two streams, one step per tick
    from tsm_surgery.integrations.streaming.batch import StreamBatch

    batch = StreamBatch(load(str(tmp_path / "mbv2.json")).step_engine())
    a, b = batch.add("a"), batch.add("b")
    clips = torch.randn(2, SEGMENTS, *FRAME)
    outs = {a: [], b: []}
    for t in range(SEGMENTS):
        batch.feed(a, clips[0, t:t + 1])
        batch.feed(b, clips[1, t:t + 1])
        for stream, logits in batch.step().items():
            outs[stream].append(logits.reshape(1, -1))
    runner = load(str(tmp_path / "mbv2.json"))
    for stream, clip in ((a, clips[0]), (b, clips[1])):
        runner.reset()
        alone = torch.cat([runner.step(clip[t:t + 1]) for t in range(SEGMENTS)])
        assert _rel(torch.cat(outs[stream]), alone) <= RTOL


def test_bench_deploy_quick_writes_its_own_section(tmp_path, capsys):
    """bench --deploy measures a runtime, checks its streaming equality and replaces only its section."""
    from tsm_surgery.cli import main
    from tsm_surgery.integrations.studies import deploy

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("<!-- bench:cpu -->\n# Benchmarks\n<!-- /bench:cpu -->\n")
    assert main(["bench", "--deploy", "--quick", "--deploy-runtimes", "onnx", "--deploy-models", R18,
                 "--output", str(out)]) == 0
    text = out.read_text()
    assert "# Benchmarks" in text and text.count("<!-- bench:deploy -->") == 1
    load_line = next(line for line in text.splitlines() if line.startswith("- load average"))
    assert "other processes" in load_line  # the run's own threads taken off the load, as in the cpu section
    row = next(line for line in text.splitlines() if line.startswith(f"| `{R18}` | onnx |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    step_ms, plain_ms, equality = float(cells[2]), float(cells[3]), float(cells[7])
    assert step_ms > 0 and plain_ms > 0 and float(cells[6]) > 0
    assert equality <= 1e-4
    # the int8 row: the static int8 step timed against the same runtime's float32 step, its stream near float32's
    row = next(line for line in text.splitlines() if line.startswith(f"| `{R18}` | onnx |") and line != row)
    cells = [c.strip() for c in row.strip("|").split("|")]
    int8_ms, float_ms, ratio = float(cells[2]), float(cells[3]), float(cells[4].split()[0])
    assert int8_ms > 0 and float_ms > 0 and ratio == pytest.approx(int8_ms / float_ms, rel=1.0)
    assert float(cells[5]) < 0.3 and 0.0 <= float(cells[6]) <= 1.0  # random weights: near, not equal
    from tsm_surgery.integrations.export.int8_cpu import saturating_int8

    assert ("portable weights" if saturating_int8() else "full-range int8 weights") in text  # the int8 form run
    machine = deploy.describe(torch.device("cpu"))
    result = deploy.DeployResult(deploy.DeploySettings(runtimes=("onnx",)), machine=machine)
    deploy.write(str(out), result)  # a second run replaces the section and keeps the others
    again = out.read_text()
    assert again.count("<!-- bench:deploy -->") == 1 and "# Benchmarks" in again and R18 not in again
    with pytest.raises(ValueError, match="runtime 'tflite'"):
        deploy.run_deploy(deploy.DeploySettings(runtimes=("tflite",)))

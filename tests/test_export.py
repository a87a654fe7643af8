"""Export: the online step (frame + caches -> output + caches) and the offline clip network, through
torch.export and ONNX, checked against PyTorch frame by frame in onnxruntime; the export verb."""

import json

import numpy as np
import pytest
import torch
from utils import randomize_norms

import tsm_surgery
from tsm_surgery.integrations.export import export_offline, export_online
from tsm_surgery.integrations.models import build_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SIZE = 64
FRAME = (3, SIZE, SIZE)
RTOL = 1e-4  # onnxruntime fuses conv + BN and reorders sums: float32 rounding, not 1e-5


def _model(spec="timm:mobilenetv2_100", classes=6):
    return randomize_norms(build_model(spec, num_classes=classes)).eval()


def _online(spec="timm:mobilenetv2_100"):
    return tsm_surgery.to_online(tsm_surgery.convert(_model(spec), n_segments=4, direction="uni"))


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def _ort_stream_matches(path, online, sidecar, batch=1, frames=4):
    """Runs the exported step frame by frame, feeding caches back by the sidecar's names."""
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in sidecar["inputs"]]
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in sidecar["outputs"]]
    caches = {s["input"]: np.zeros(s["shape"], np.float32) for s in sidecar["state"]}
    state = online.init_state(batch, frame_shape=FRAME)
    assert [list(v.shape) for v in state.values()] == [s["shape"] for s in sidecar["state"]]
    worst = 0.0
    for _ in range(frames):
        x = torch.randn(batch, *FRAME)
        results = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"frames": x.numpy(), **caches})))
        out, state = online.step(x, state)
        worst = max(worst, _rel(results["output"], out))
        for s in sidecar["state"]:
            if state[s["site"]].abs().max() > 0:
                worst = max(worst, _rel(results[s["output"]], state[s["site"]]))
        caches = {s["input"]: results[s["output"]] for s in sidecar["state"]}
    assert worst <= RTOL, worst
    return worst


@torch.no_grad()
def test_torch_export_of_the_step_runs_frame_by_frame():
    online = _online()
    state = online.init_state(2, frame_shape=FRAME)
    program = torch.export.export(online.step_module, (torch.randn(2, *FRAME), *state.values()))
    placeholders = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(placeholders) == 1 + len(state) and len(program.graph_signature.user_outputs) == 1 + len(state)
    exported = program.module()
    exported_state = dict(state)
    for _ in range(4):
        x = torch.randn(2, *FRAME)
        results = exported(x, *exported_state.values())
        exported_state = dict(zip(state, results[1:]))
        out, state = online.step(x, state)
        torch.testing.assert_close(results[0], out, rtol=1e-5, atol=1e-6)
    for name in state:
        torch.testing.assert_close(exported_state[name], state[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_onnx_online_step_round_trip(tmp_path, exporter):
    online = _online()
    path = tmp_path / "online.onnx"
    sidecar = export_online(online, str(path), batch_size=2, frame_shape=FRAME, exporter=exporter)
    assert len(sidecar["state"]) == len(online.state_names)
    assert [s["site"] for s in sidecar["state"]] == online.state_names
    _ort_stream_matches(path, online, sidecar, batch=2)


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
@torch.no_grad()
def test_onnx_offline_with_a_dynamic_number_of_clips(tmp_path, exporter):
    segments = 4
    model = _model("timm:resnet18")
    net = tsm_surgery.convert(model, n_segments=segments).eval()
    path = tmp_path / "offline.onnx"
    sidecar = export_offline(net, str(path), frame_shape=FRAME, exporter=exporter)
    assert sidecar["inputs"][0]["shape"][0] == f"N*{segments}"
    session = _session(path)
    for clips in (1, 3):
        x = torch.randn(clips * segments, *FRAME)
        got = session.run(None, {"clips": x.numpy()})[0]
        expected = net(x)
        assert got.shape == tuple(expected.shape)
        assert _rel(got, expected) <= RTOL
        # the exported graph really shifts: it is not the 2D model
        assert _rel(got, model(x)) > 100 * RTOL


def test_export_verb_online_writes_onnx_and_sidecar(tmp_path, capsys):
    from tsm_surgery.cli import main

    model = _model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    out = tmp_path / "exports" / "mbv2.onnx"
    assert main(["export", "--model", "timm:mobilenetv2_100", "--online", "--checkpoint", str(tmp_path / "w.pth"),
                 "--num-classes", "6", "--size", str(SIZE), "--exporter", "legacy", "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "exports" / "mbv2.json").read_text())
    assert sidecar["form"] == "online" and sidecar["direction"] == "uni" and sidecar["onnx"] == "mbv2.onnx"
    assert sidecar["inputs"][0] == {"name": "frames", "shape": [1, *FRAME], "dtype": "float32"}
    # The sidecar's pairs drive an onnxruntime stream equal to the online module with the same weights.
    online = tsm_surgery.to_online(tsm_surgery.convert(model, n_segments=8, direction="uni"))
    assert [s["site"] for s in sidecar["state"]] == online.state_names
    _ort_stream_matches(out, online, sidecar)


def test_export_verb_offline_and_errors(tmp_path):
    from tsm_surgery.cli import main

    out = tmp_path / "r18.onnx"
    assert main(["export", "--model", "timm:resnet18", "--offline", "--n-segments", "2", "--size", "32",
                 "--exporter", "legacy", "--output", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["form"] == "offline" and sidecar["n_segments"] == 2 and sidecar["state"] == []
    session = _session(out)
    for clips in (1, 2):
        assert session.run(None, {"clips": np.zeros((2 * clips, 3, 32, 32), np.float32)})[0].shape == (2 * clips, 1000)
    with pytest.raises(ValueError, match="uni"):
        main(["--debug", "export", "--model", "timm:resnet18", "--online", "--direction", "bi"])
    with pytest.raises(ValueError, match="num-classes"):
        torch.save(_model("timm:resnet18", classes=3).state_dict(), tmp_path / "r18.pth")
        main(["export", "--model", "timm:resnet18", "--checkpoint", str(tmp_path / "r18.pth"), "--size", "32",
              "--output", str(tmp_path / "x.onnx"), "--debug"])


def test_export_never_overwrites_without_force(tmp_path, capsys):
    from tsm_surgery.cli import main

    out, side, data = tmp_path / "r18.onnx", tmp_path / "r18.json", tmp_path / "r18.onnx.data"
    argv = ["export", "--model", "timm:resnet18", "--offline", "--n-segments", "2", "--size", "32",
            "--exporter", "legacy", "--output", str(out)]
    side.write_text("the user's own json")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "r18.json already exists" in err
    assert all(str(p) in err for p in (out, data, side)) and "belong together" in err and "--force" in err
    assert side.read_text() == "the user's own json" and not out.exists()

    data.write_bytes(b"weights of an older dynamo export")  # --force replaces the whole set: no stale member
    assert main(argv + ["--force"]) == 0
    assert json.loads(side.read_text())["onnx"] == "r18.onnx" and not data.exists()
    graph = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 1 and "r18.onnx, " in capsys.readouterr().err.split("already exist")[0]
    assert out.read_bytes() == graph


def test_export_sidecar_cannot_land_on_the_graph(tmp_path, capsys):
    from tsm_surgery.cli import main

    target = tmp_path / "x.json"
    assert main(["export", "--model", "timm:resnet18", "--offline", "--size", "32", "--exporter", "legacy",
                 "--output", str(target)]) == 1
    assert "would overwrite the ONNX graph" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _graph_ranks(path):
    """{value name: rank} of every value of the ONNX graph after shape inference, and its op types."""
    import onnx
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(onnx.load(str(path))).graph
    ranks = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        ranks[value.name] = len(tensor.shape.dim) if tensor.HasField("shape") else None
    ranks.update({init.name: len(init.dims) for init in graph.initializer})
    return ranks, {node.op_type for node in graph.node}


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("form", ["offline-bi", "offline-uni-first", "online"])
@torch.no_grad()
def test_exported_graphs_are_rank_4_without_scatter(tmp_path, exporter, form):
    """NNAPI, CoreML and MNN take tensors of rank 4 at most and no ScatterND: every value of the
    graph, not only its inputs and outputs, has a known rank <= 4, and the graph still computes
    the eager network's numbers."""
    path = tmp_path / f"{form}.onnx"
    if form == "online":
        online = _online()
        export_online(online, str(path), batch_size=1, frame_shape=FRAME, exporter=exporter)
    else:
        direction, slot = ("bi", "past") if form == "offline-bi" else ("uni", "first")
        net = tsm_surgery.convert(_model(), n_segments=4, direction=direction, uni_slot=slot).eval()
        export_offline(net, str(path), frame_shape=FRAME, exporter=exporter)
        x = torch.randn(8, *FRAME)
        assert _rel(_session(path).run(None, {"clips": x.numpy()})[0], net(x)) <= RTOL
    ranks, ops = _graph_ranks(path)
    assert len(ranks) > 100
    unknown = [name for name, rank in ranks.items() if rank is None]
    assert not unknown, unknown[:5]
    five_d = {name: rank for name, rank in ranks.items() if rank > 4}
    assert not five_d, list(five_d.items())[:5]
    assert "ScatterND" not in ops

"""``bench --deploy-accuracy``: a demo run's trained TSM models classified in PyTorch and a runtime."""

import json

import pytest

from tsm_surgery.cli import main

deploy_accuracy = pytest.importorskip("tsm_surgery.integrations.studies.deploy_accuracy")
pytest.importorskip("mmaction")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--epochs", "1", "--videos-per-class", "3", "--models", "tsm,tsm-uni", "--no-stream",
                 "--out-dir", str(run)]) == 0
    return run


@pytest.mark.slow  # a one-epoch demo of two models, then export and int8 calibration (about a minute)
def test_pytorch_reference_is_the_recognizer_and_float32_onnx_agrees(demo_run, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept\n")
    assert main(["bench", "--deploy-accuracy", str(demo_run), "--deploy-runtimes", "onnx", "--output", str(out)]) == 0
    text = out.read_text()
    assert "kept" in text and "## Deploy accuracy" in text
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line for line in text.splitlines()
            if line.startswith("| tsm")}
    measured = (("pytorch", "f32"), ("pytorch (PT2E)", "int8"), ("onnx", "f32"), ("onnx", "int8"))
    assert set(rows) == {(m, r, p) for m in ("tsm", "tsm-uni") for r, p in measured}
    # The per-frame classifier ranks classes as the recognizer's own MMAction2 test does (its top-1 is in summary.json).
    tested = json.loads((demo_run / "summary.json").read_text())["models"]
    for model in ("tsm", "tsm-uni"):
        top1 = float(rows[(model, "pytorch", "f32")].split("|")[4].strip(" %"))
        assert top1 == pytest.approx(100 * tested[model]["test"]["acc/top1"], abs=0.05)
        assert rows[(model, "onnx", "f32")].rstrip(" |").endswith("100.0%")  # agreement with PyTorch float32


def test_a_directory_without_a_demo_run_is_one_line(tmp_path, capsys):
    assert main(["bench", "--deploy-accuracy", str(tmp_path), "--output", str(tmp_path / "B.md")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished `tsm-surgery demo`" in err[0]
    assert not (tmp_path / "B.md").exists()


def test_unknown_runtime_is_refused(tmp_path, capsys):
    assert main(["bench", "--deploy-accuracy", str(tmp_path), "--deploy-runtimes", "openvino-bf16"]) == 1
    assert "choose among onnx, openvino, executorch" in capsys.readouterr().err

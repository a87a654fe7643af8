"""The demo job: its pieces (fast) and a tiny end-to-end run through mmengine's Runner (slow)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tsm_surgery.integrations.demo import pipeline as demo
from tsm_surgery.integrations.demo import synth_data

REPO = Path(__file__).resolve().parents[1]


def test_pair_metric_counts_within_pair_decisions():
    metric = demo.TimeReversalPairMetric()
    # 6 videos, one per class. Scores favour the right pair but always its first class.
    for label in range(6):
        score = torch.full((6,), 0.01)
        score[2 * (label // 2)] = 0.9
        score[2 * (label // 2) + 1] = 0.05
        metric.process(None, [{"pred_score": score, "gt_label": torch.tensor([label])}])
    out = metric.evaluate(6)
    assert out["pair/top1"] == pytest.approx(0.5)
    for pair, _, _ in synth_data.PAIRS:
        assert out[f"pair/{pair}_top1"] == pytest.approx(0.5)
        assert out[f"pair/{pair}_within"] == pytest.approx(0.5)
        assert out[f"pair/{pair}_n"] == 2


def test_format_table_lists_every_model_and_pair():
    test = {"pair/top1": 0.5}
    for pair, _, _ in synth_data.PAIRS:
        test.update({f"pair/{pair}_top1": 0.5, f"pair/{pair}_within": 0.5})
    table = demo.format_table({"tsn": {"test": test}, "tsm": {"test": {**test, "pair/top1": 0.97}}})
    assert "tsn" in table and "97.0%" in table
    assert all(pair in table for pair, _, _ in synth_data.PAIRS)


def test_refuses_a_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    from tsm_surgery.cli import main

    assert main(["demo", "--out-dir", str(tmp_path), "--epochs", "1"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unknown_model_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="tsn, tsm, tsm-uni"):
        demo.run_demo(str(tmp_path / "x"), models=["tsn", "i3d"])


@pytest.mark.parametrize("name", list(demo.MODELS_TRAINED))
def test_demo_configs_build_the_intended_models(name, tmp_path):
    from mmaction.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmaction")
    cfg = demo.build_cfg(name, tmp_path / "data", tmp_path / "work", epochs=3, seed=0)
    assert cfg.train_cfg.max_epochs == 3
    assert cfg.train_dataloader.dataset.ann_file == str(tmp_path / "data" / "train.txt")
    model = MODELS.build(cfg.model)
    if name == "tsn":
        assert type(model.backbone).__name__ == "ResNet"
    else:
        assert type(model.backbone).__name__ == "TSMSurgeryBackbone"
        assert model.backbone.direction == ("uni" if name == "tsm-uni" else "bi")
        assert len(model.backbone.sites) == 8  # every BasicBlock of ResNet-18
    # TSN and TSM have the same parameters: the shift adds none.
    n_params = sum(p.numel() for p in model.parameters())
    tsn = MODELS.build(demo.build_cfg("tsn", tmp_path / "data", tmp_path / "work", 3, 0).model)
    assert n_params == sum(p.numel() for p in tsn.parameters())


def test_stream_video_matches_the_offline_uni_network(tmp_path):
    from mmaction.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmaction")
    cfg = demo.build_cfg("tsm-uni", tmp_path / "data", tmp_path / "work", epochs=1, seed=0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    clip = torch.randn(8, 3, 64, 64)
    out = demo.stream_video(model, clip)
    assert out["online"] is True
    assert len(out["per_frame"]) == 8
    assert out["max_abs_diff_vs_offline"] < 1e-4
    # The running prediction after frame t is the offline uni network on frames 0..t.
    model.backbone.num_segments = 3
    with torch.no_grad():
        prefix = model.cls_head(model.backbone(clip[:3]), num_segs=3)[0].softmax(-1)
    np.testing.assert_allclose(out["per_frame"][2]["running_probs"], prefix.numpy(), atol=1e-3)


@pytest.mark.slow
def test_tiny_end_to_end_demo(tmp_path, capsys):
    """Data, three Runner trainings, test, plot, summary and streaming on a tiny setting."""
    summary = demo.run_demo(str(tmp_path / "run"), epochs=1, videos_per_class=3, frames=8, size=32, seed=1,
                            batch_size=6)
    run_dir = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "[4/4] streaming" in printed and "frame 7:" in printed
    assert (run_dir / "curves.png").stat().st_size > 1000
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["models"].keys() == set(demo.MODELS_TRAINED)
    for _name, res in on_disk["models"].items():
        assert 0.0 <= res["test"]["pair/top1"] <= 1.0
        assert res["test"]["acc/top1"] == pytest.approx(res["test"]["pair/top1"])
        assert len(res["val_top1_per_epoch"]) == 1
    assert on_disk["stream"]["online"] is True
    assert on_disk["stream"]["max_abs_diff_vs_offline"] < 1e-4
    assert summary["data"]["counts"] == {"train": 6, "val": 6, "test": 6}
    # A second run into the same directory is refused; --force replaces the demo's own files.
    with pytest.raises(FileExistsError):
        demo.run_demo(str(run_dir), epochs=1, videos_per_class=3, frames=8, size=32)

"""``tsm-surgery ablate``: the --quick grid end to end, its table against its JSON, resume, bad input."""

import json
import re

import pytest

from tsm_surgery.cli import main
from tsm_surgery.integrations.studies import ablate
from tsm_surgery.integrations.studies.ablate_report import proportion

# 64 > the demo network's 32 channels in layer1: a grid point that cannot convert.
ARGS = ["ablate", "--quick", "--shift-divs", "8,64"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "run"
    assert main([*ARGS, "--out-dir", str(out)]) == 0
    return out


def _table_rows(md: str):
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| shifted")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]


def _numbers(cell: str):
    return [float(v) for v in re.findall(r"\d+\.\d+", cell)]


def test_quick_run_writes_a_table_that_matches_its_json(quick_run):
    summary = json.loads((quick_run / "ablation.json").read_text())
    rows = _table_rows((quick_run / "ablation.md").read_text())
    assert (quick_run / "ablation.png").stat().st_size > 10_000
    # TSN, then every shift_div x place of the grid, in order.
    expected = [(None, "tsn")] + [(d, p) for d in (8, 64) for p in ("residual", "block")]
    assert [(r["shift_div"], r["place"]) for r in summary["rows"]] == expected
    assert len(rows) == len(expected)
    for cells, row in zip(rows, summary["rows"]):
        assert cells[0] == (proportion(row["shift_div"]) if row["shift_div"] else "0")
        assert cells[2] == row["place"]
        if row["shift_div"] == 8:
            lat = row["latency"]
            assert _numbers(cells[3]) == pytest.approx([lat["ratio"], lat["p25"], lat["p75"]], abs=6e-4)
            assert lat["p25"] <= lat["ratio"] <= lat["p75"]
        acc = row["accuracy"]
        if "error" not in acc:
            assert len(acc["top1"]) == 2  # two seeds per point
            assert acc["top1_mean"] == pytest.approx(sum(acc["top1"]) / 2)
            assert _numbers(cells[4]) == pytest.approx([100 * acc["top1_mean"]] + [100 * v for v in acc["top1"]],
                                                       abs=0.051)
            assert _numbers(cells[5]) == pytest.approx([100 * acc["within_mean"]], abs=0.051)
    assert summary["latency_control"]["p25"] <= summary["latency_control"]["p75"]
    assert summary["data"]["motion_scale"] == ablate.HARD_DATA["motion_scale"]


def test_a_point_that_cannot_convert_is_reported_not_raised(quick_run):
    summary = json.loads((quick_run / "ablation.json").read_text())
    bad = [r for r in summary["rows"] if r["shift_div"] == 64]
    assert len(bad) == 2
    for row in bad:
        assert "fewer than shift_div=64" in row["latency"]["error"]
        assert row["accuracy"]["error"].startswith("cannot convert")
    for cells in _table_rows((quick_run / "ablation.md").read_text())[-2:]:
        assert cells[1] == "64" and cells[3].startswith("cannot convert") and cells[4].startswith("cannot convert")


def test_resume_runs_only_the_missing_points(quick_run, capsys):
    points = quick_run / "points"
    missing = points / "acc_block_8_seed1.json"
    missing.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")}
    capsys.readouterr()
    assert main([*ARGS, "--out-dir", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert "1 point(s) to run" in out and "train block shift_div=8 seed 1" in out
    assert "latency:" not in out and "train tsn" not in out
    assert {p.name: p.stat().st_mtime_ns for p in points.glob("*.json") if p.name in before} == before
    assert missing.is_file()


def test_resume_with_other_settings_is_refused(quick_run, capsys):
    assert main([*ARGS, "--out-dir", str(quick_run), "--seeds", "3"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_a_folder_that_holds_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["ablate", "--quick", "--out-dir", str(tmp_path)]) == 1
    assert "holds no ablation" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("spec, match", [("foo:bar", "timm:NAME"), ("mmaction:mobilenet", "mmaction:resnetNN")])
def test_bad_model_spec_fails_before_writing(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        ablate.run_ablation(tmp_path / "out", {"model": spec})
    assert not (tmp_path / "out").exists()


def test_latency_grid_on_an_mmaction_spec():
    res = ablate.measure_latency("mmaction:resnet18", [8, 4096], ["residual", "block"], frames=2, size=32, rounds=1)
    assert set(res["points"]) == {"residual/8", "block/8", "residual/4096", "block/4096"}
    assert res["points"]["block/8"]["ratio"] > 0
    assert "cannot convert" in res["points"]["residual/4096"]["error"]


def test_proportion_is_the_total_shifted_share():
    assert [proportion(d) for d in (16, 8, 4, 2, 0)] == ["1/8", "1/4", "1/2", "1", "0"]


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_a_spec_backbone_goes_into_the_training_config_with_its_width(spec, tmp_path):
    settings = ablate.AblationSettings(ablate.QUICK)
    tsn = ablate._train_cfg(spec, 0, "residual", tmp_path, tmp_path / "tsn", settings, 0)
    tsm = ablate._train_cfg(spec, 8, "block", tmp_path, tmp_path / "tsm", settings, 0)
    assert tsn.model.backbone == ablate.backbone_dict(spec)
    assert tsm.model.backbone.backbone == ablate.backbone_dict(spec)
    assert tsm.model.backbone.shift_div == 8 and tsm.model.backbone.shift_place == "block"
    assert tsn.model.cls_head.in_channels == tsm.model.cls_head.in_channels == 512  # ResNet-18's last stage


@pytest.mark.parametrize("pair", [0, 1, 2])
def test_the_harder_data_scales_motion_and_noise_and_keeps_the_default_data(pair):
    import numpy as np

    from tsm_surgery.integrations.demo.synth_data import sample_params

    def draw(**kwargs):
        return sample_params(pair, np.random.default_rng([0, pair, 3]), 64, 16, **kwargs)

    default, hard = draw(), draw(motion_scale=0.5, noise_scale=2.0)
    assert draw(motion_scale=1.0, noise_scale=1.0) == default  # the demo's data does not move
    assert hard["noise_sigma"] == pytest.approx(2 * default["noise_sigma"])
    motion = {0: lambda p: p["x1"] - p["x0"], 1: lambda p: p["r1"] - p["r0"], 2: lambda p: p["turn"]}[pair]
    assert motion(hard) == pytest.approx(0.5 * motion(default))
    assert hard["color"] == default["color"] and hard["background"] == default["background"]


@pytest.mark.parametrize("kwargs", [{"motion_scale": 0}, {"motion_scale": 1.5}, {"noise_scale": -1}])
def test_the_harder_data_refuses_out_of_range_scales(tmp_path, kwargs):
    from tsm_surgery.integrations.demo.synth_data import generate

    with pytest.raises(ValueError, match="motion_scale"):
        generate(tmp_path / "d", videos_per_class=3, **kwargs)
    assert not (tmp_path / "d").exists()

"""``tsm-surgery efficiency``: every listed stock model builds, counts and times; the report and its section."""

import json

import pytest
import torch

from tsm_surgery.cli import main
from tsm_surgery.integrations.studies import efficiency

FRAMES, SIZE = 8, 32  # the table's 8 frames, at a tiny size


@pytest.fixture(scope="module")
def built():
    out = {}
    for name in efficiency.STOCK_CONFIGS:
        model = efficiency.build_recognizer(name)
        x = efficiency.clip_input(model, 1, FRAMES, SIZE)
        torch.manual_seed(0)
        out[name] = (model, x, efficiency.count_flops(model, x))
    return out


@pytest.mark.parametrize("name", list(efficiency.STOCK_CONFIGS))
def test_every_listed_model_builds_and_predicts_400_classes(built, name):
    model, x, flops = built[name]
    assert tuple(efficiency._forward(model, x).shape) == (1, 400)
    assert flops > 0


def test_tsm_costs_what_tsn_costs(built):
    # The paper's claim as counted FLOPs and parameters: the shift adds neither.
    tsn, ours, stock = (built[n] for n in ("TSN", "TSM (ours)", "ResNetTSM"))
    assert ours[2] == tsn[2]
    # The stock TSM config's TSMHead runs its linear layer on every frame before averaging; TSNHead
    # averages first. That head is the whole difference.
    assert stock[2] - tsn[2] == (FRAMES - 1) * 2 * 2048 * 400
    params = [sum(p.numel() for p in m[0].parameters()) for m in (tsn, ours, stock)]
    assert params[0] == params[1] == params[2]


def test_tsn_flops_are_eight_frames_of_resnet50_plus_the_head(built):
    from torch.utils.flop_counter import FlopCounterMode

    model, _, flops = built["TSN"]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.backbone(torch.randn(FRAMES, 3, SIZE, SIZE))
    assert flops == counter.get_total_flops() + 2 * 2048 * 400  # the head's one linear layer


def test_3d_networks_cost_more_than_tsn_at_their_stock_clip(built):
    assert efficiency.stock_frames("I3D") == 32 and efficiency.stock_frames("TSN") == 8
    for name in ("SlowOnly", "TPN"):
        assert built[name][2] > built["TSN"][2], name
    # I3D pools time by 4 in its stem: on 8 frames it is cheaper than TSN, on its own 32 it is not.
    model = built["I3D"][0]
    assert built["I3D"][2] < built["TSN"][2]
    assert efficiency.count_flops(model, efficiency.clip_input(model, 1, 32, SIZE)) > built["TSN"][2]


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="choose from"):
        efficiency.build_recognizer("X3D")
    assert main(["efficiency", "--models", "TSN,X3D"]) == 1


def test_cli_writes_its_section_and_keeps_the_rest(tmp_path):
    out, png, js = tmp_path / "BENCH.md", tmp_path / "eff.png", tmp_path / "eff.json"
    out.write_text("# Benchmarks\n\nthe bench's own text\n")
    args = ["efficiency", "--models", "TSN,TSM (ours)", "--size", "32", "--rounds", "1", "--threads", "1",
            "--output", str(out), "--plot", str(png), "--json", str(js)]
    for _ in range(2):  # a second run replaces the section, not appends it
        assert main(args) == 0
    text = out.read_text()
    assert text.count("the bench's own text") == 1 and text.index("the bench's own text") < text.index("## Eff")
    assert text.count("<!-- bench:efficiency -->") == 1 and text.count("## Efficiency") == 1
    result = json.loads(js.read_text())
    for name, row in result["rows"].items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {row['gflops']:.1f} | {row['params_m']:.1f} | {row['latency_ratio']:.2f}x" in line
    online = result["online"]
    assert online["2D frame"]["ratio"] == 1.0 and online["offline clip pass"]["ratio"] > 0
    assert png.stat().st_size > 5_000

import subprocess
import sys

import pytest
import torch

import tsm_surgery
from tsm_surgery.cli import VERBS, main


def test_convert_prints_table_and_saves(tmp_path, capsys):
    out, graph = tmp_path / "net.pt", tmp_path / "graph.py"
    assert main(["convert", "timm:resnet18", "--n-segments", "4", "--direction", "uni",
                 "--out", str(out), "--graph", str(graph)]) == 0
    printed = capsys.readouterr().out
    assert "layer4.1" in printed and "8 sites shifted (uni" in printed
    net = torch.load(out, weights_only=False)
    assert isinstance(net, tsm_surgery.TSMNet) and net.n_segments == 4 and net.direction == "uni"
    assert "temporal_shifts" in graph.read_text()


def test_unknown_model_names_close_matches(capsys):
    try:
        main(["convert", "timm:resnet1800"])
    except ValueError as err:
        assert "resnet18" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "tsm_surgery.cli", "convert", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--n-segments" in result.stdout


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"tsm-surgery {verb}" in capsys.readouterr().out

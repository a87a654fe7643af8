"""Train, validate and test through mmengine's real Runner on tiny real videos; checkpoints; bad input."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("mmaction")

from utils import make_dataset, write_config

from tsm_surgery.integrations.mmaction.checkpoint import CheckpointLoadError
from tsm_surgery.integrations.training import runner as api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("videos")), per_class=2, frames=8)


@pytest.fixture(scope="module")
def config(data, tmp_path_factory):
    # The config says num_segments=8 in backbone and head; the pipeline samples 4 frames.
    return write_config(str(tmp_path_factory.mktemp("cfg") / "tiny_tsm.py"), data, num_frames=4, max_epochs=1)


@pytest.fixture(scope="module")
def trained(config, tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp("work"))
    start = time.perf_counter()
    runner = api.train(config, work_dir=work_dir)
    return runner, work_dir, time.perf_counter() - start


def test_train_val_test_cycle(trained, config, capsys):
    runner, work_dir, seconds = trained
    assert runner.epoch == 1 and runner.iter == 2  # 4 videos, batch 2
    # The clip length followed the pipeline (4 frames), not the config's num_segments=8.
    assert runner.model.backbone.num_segments == 4 and runner.model.cls_head.num_segments == 4
    assert os.path.isfile(os.path.join(work_dir, "epoch_1.pth"))
    val_top1 = runner.message_hub.get_scalar("val/acc/top1").current()
    assert 0.0 <= val_top1 <= 1.0
    loss = runner.message_hub.get_scalar("train/loss").current()
    assert loss == loss and loss > 0  # finite, real
    print(f"\ntiny TSM-R18 (4 frames, 32 px, batch 2): train+val 1 epoch in {seconds:.1f} s")

    metrics = api.test(config, os.path.join(work_dir, "epoch_1.pth"), work_dir=work_dir)
    assert set(metrics) >= {"acc/top1", "acc/top5", "acc/mean1"}
    # Same videos and pipeline as validation: the checkpoint reproduces the trained model.
    assert metrics["acc/top1"] == pytest.approx(val_top1)


def test_cli_test_verb_prints_only_json(trained, config, capsys, tmp_path):
    """`tsm-surgery test ... > metrics.json` is JSON: mmengine's log lines go to stderr; --out writes a file."""
    from tsm_surgery.cli import main

    _, work_dir, _ = trained
    out_file = tmp_path / "metrics.json"
    argv = ["test", config, os.path.join(work_dir, "epoch_1.pth"), "--work-dir", work_dir, "--out", str(out_file)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)  # the whole of stdout
    assert 0.0 <= metrics["acc/top1"] <= 1.0
    assert "Epoch(test)" in captured.err  # the logs went to stderr
    assert json.loads(out_file.read_text()) == metrics
    assert main(argv) == 1 and "metrics.json already exists" in capsys.readouterr().err  # no overwrite
    assert json.loads(out_file.read_text()) == metrics


def test_load_from_is_weights_only_and_exact(trained, config, tmp_path):
    _, work_dir, _ = trained
    checkpoint = os.path.join(work_dir, "epoch_1.pth")
    cfg = api.load_config(config, work_dir=str(tmp_path))
    cfg.load_from = checkpoint
    fresh = api.build_runner(cfg)
    fresh.load_or_resume()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    got = fresh.model.state_dict()
    assert set(saved) == set(got)
    assert all(torch.equal(saved[k], got[k]) for k in saved)


def test_resume_continues_training_state(trained, config, tmp_path):
    import shutil

    _, work_dir, _ = trained
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(work_dir, resumed_dir)
    runner = api.train(config, work_dir=resumed_dir, resume=True, cfg_options={"train_cfg.max_epochs": 2})
    assert runner.epoch == 2 and runner.iter == 4  # continued from epoch 1, iteration 2
    assert os.path.isfile(os.path.join(resumed_dir, "epoch_2.pth"))
    state = torch.load(os.path.join(resumed_dir, "epoch_2.pth"), map_location="cpu", weights_only=False)
    assert state["meta"]["epoch"] == 2 and state["optimizer"]["state"]  # momentum buffers came along


def test_work_dir_not_overwritten(trained, config):
    _, work_dir, _ = trained
    checkpoint = os.path.join(work_dir, "epoch_1.pth")
    stamp = os.path.getmtime(checkpoint), os.path.getsize(checkpoint)
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        api.train(config, work_dir=work_dir)
    assert (os.path.getmtime(checkpoint), os.path.getsize(checkpoint)) == stamp


def _untrusted_checkpoint(trained, tmp_path):
    """Our checkpoint plus a pickled object that weights_only=True refuses."""
    import collections

    _, work_dir, _ = trained
    state = torch.load(os.path.join(work_dir, "epoch_1.pth"), map_location="cpu", weights_only=False)
    state["meta"]["extra"] = collections.OrderedDict  # a class reference: not weights
    state["meta"]["extra_obj"] = os.stat_result((0,) * 10)
    path = str(tmp_path / "untrusted.pth")
    torch.save(state, path)
    return path


def test_untrusted_checkpoint_is_refused_for_load_from(trained, config, tmp_path):
    path = _untrusted_checkpoint(trained, tmp_path)
    with pytest.raises(CheckpointLoadError, match="untrusted.pth.*not loaded: unpickling it could run code"):
        api.test(config, path, work_dir=str(tmp_path / "w"))


def test_untrusted_checkpoint_resumes_with_opt_in(trained, config, tmp_path):
    path = _untrusted_checkpoint(trained, tmp_path)
    runner = api.train(config, work_dir=str(tmp_path / "w"), resume=path, cfg_options={"train_cfg.max_epochs": 2})
    assert runner.epoch == 2


def test_stock_layout_checkpoint_is_imported(trained, config, tmp_path, capsys):
    """A checkpoint in MMAction2 ResNetTSM's layout (shifted convs wrapped as '.net') tests directly."""
    _, work_dir, _ = trained
    original = os.path.join(work_dir, "epoch_1.pth")
    state = torch.load(original, map_location="cpu", weights_only=False)["state_dict"]
    stock = {k.replace("conv1.conv.", "conv1.conv.net.") if k.startswith("backbone.layer") else k: v
             for k, v in state.items()}
    path = str(tmp_path / "resnettsm_layout.pth")
    torch.save({"state_dict": stock}, path)
    expected = api.test(config, original, work_dir=str(tmp_path / "a"))
    assert api.test(config, path, work_dir=str(tmp_path / "b")) == expected
    logged = capsys.readouterr()
    assert "detected MMAction2 ResNetTSM (depth 18) recognizer, 8 shifted modules" in logged.out + logged.err


def test_checkpoint_keys_mismatch(trained, config, tmp_path):
    _, work_dir, _ = trained
    state = torch.load(os.path.join(work_dir, "epoch_1.pth"), map_location="cpu", weights_only=False)
    # ResNetTSM's layout, but without the last stage: another depth, refused with the file named.
    state["state_dict"] = {k.replace("conv1.conv.", "conv1.conv.net.") if k.startswith("backbone.layer") else k: v
                           for k, v in state["state_dict"].items() if not k.startswith("backbone.layer4.")}
    path = str(tmp_path / "other_keys.pth")
    torch.save({"state_dict": state["state_dict"]}, path)
    with pytest.raises(ValueError, match=r"CHECKPOINT=.*other_keys.pth.*detected MMAction2 ResNetTSM.*"
                                         r"get no weights \(first: \['backbone\.layer4\.0\."):
        api.test(config, path, work_dir=str(tmp_path / "w"))


def test_missing_files(config, data, tmp_path):
    with pytest.raises(FileNotFoundError, match="CHECKPOINT"):
        api.test(config, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=r"train_dataloader.dataset.ann_file='.*missing.txt'"):
        api.train(config, work_dir=str(tmp_path / "w"),
                  cfg_options={"train_dataloader.dataset.ann_file": str(tmp_path / "missing.txt")})
    with pytest.raises(FileNotFoundError, match="config file"):
        api.train(str(tmp_path / "no_config.py"))
    assert not os.path.exists(tmp_path / "w")  # nothing written before the check


def test_unknown_backbone_type(config, tmp_path):
    with pytest.raises(KeyError, match=r"model.backbone.type='NoSuchBackbone'.*custom_imports"):
        api.train(config, work_dir=str(tmp_path / "w"), cfg_options={"model.backbone.type": "NoSuchBackbone"})


def test_clip_length_hook_follows_test_pipeline(trained, config, tmp_path):
    """Built with 4 frames per clip, tested with a 2-frame pipeline: the hook re-sets backbone and head."""
    from mmengine.runner import Runner

    _, work_dir, _ = trained
    cfg = api.load_config(config, work_dir=str(tmp_path))  # syncs to the train pipeline: 4 frames
    assert cfg.model.backbone.num_segments == 4
    cfg.test_dataloader.dataset.pipeline[1]["num_clips"] = 2
    cfg.load_from = os.path.join(work_dir, "epoch_1.pth")
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()  # 2 clips x 2 frames per batch: would fail with num_segments=4
    assert runner.model.backbone.num_segments == 2 and runner.model.cls_head.num_segments == 2
    assert 0.0 <= metrics["acc/top1"] <= 1.0


@pytest.mark.slow
def test_ddp_two_processes_cpu(config, tmp_path):
    """`torchrun --nproc_per_node 2 ... --launcher pytorch`: DDP over gloo on CPU."""
    work_dir = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "tests"))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "tsm_surgery.cli", "train", config,
           "--launcher", "pytorch", "--work-dir", work_dir]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # mmengine prints the world size as "GPU number", whatever the device.
    assert "Distributed training: True" in log and "GPU number: 2" in log, log[-3000:]
    assert log.count("Epoch(train) [1][1/1]") == 1  # rank 0 logs; rank 1 trained its half
    # 4 videos, batch 2 per process, 2 processes: one iteration per epoch.
    assert "Epoch(train) [1][1/1]" in log
    assert os.path.isfile(os.path.join(work_dir, "epoch_1.pth"))
    state = torch.load(os.path.join(work_dir, "epoch_1.pth"), map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in state["state_dict"])

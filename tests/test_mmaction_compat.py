"""Each patch in tsm_surgery.integrations.mmaction.compat, with a check that fails without it."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("mmaction")

from tsm_surgery.integrations.mmaction import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_every_patch_is_listed_and_idempotent():
    names = [p.__name__ for p in compat.PATCHES]
    assert names == ["_placeholder_drn", "_no_pkg_resources", "_weights_only_checkpoints", "_trusted_resume",
                     "_cpu_distributed"]
    compat.apply()
    compat.apply()


def test_drn_placeholder():
    # Without the patch the wheel's `import mmaction.models` fails on the missing DRN package.
    proc = _python("import mmaction.models")
    assert proc.returncode != 0 and "drn" in proc.stderr.lower()
    compat.apply()
    import mmaction.models  # noqa: F401
    from mmaction.registry import MODELS

    assert MODELS.get("ResNetTSM") is not None


def test_no_pkg_resources(tmp_path):
    # setuptools >= 82 has no pkg_resources: simulate it; `mmaction::` config paths still resolve.
    cfg = tmp_path / "child.py"
    base = "mmaction::recognition/tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.py"
    cfg.write_text(f"_base_ = [{base!r}]\n")
    proc = _python(f"""
        import sys
        sys.modules['pkg_resources'] = None  # as if setuptools >= 82
        from mmengine.config import Config
        cfg = {str(cfg)!r}
        try:
            Config.fromfile(cfg)
            print('UNPATCHED OK')
        except Exception as err:
            print('UNPATCHED FAILS', type(err).__name__)
        from tsm_surgery.integrations.mmaction import compat
        compat._no_pkg_resources()
        print('PATCHED', Config.fromfile(cfg).model.backbone.type)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNPATCHED FAILS" in proc.stdout and "PATCHED ResNetTSM" in proc.stdout


def _mmengine_style_checkpoint(path):
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("compat_test")
    hub.update_scalar("train/loss", 0.5)
    model = torch.nn.Linear(3, 2)
    torch.save({"state_dict": model.state_dict(), "message_hub": hub.state_dict(), "meta": {"epoch": 1}}, path)
    return model


def test_weights_only_checkpoint_loader(tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader, load_from_local

    path = str(tmp_path / "epoch_1.pth")
    model = _mmengine_style_checkpoint(path)
    # mmengine's own loader under torch >= 2.6 (weights_only=True by default) fails on the message hub.
    with pytest.raises(pickle.UnpicklingError):
        load_from_local(path, "cpu")
    compat.apply()
    loaded = CheckpointLoader.load_checkpoint(path, map_location="cpu")
    assert torch.equal(loaded["state_dict"]["weight"], model.weight)
    assert loaded["message_hub"]["log_scalars"]["train/loss"].current() == 0.5


def test_weights_only_refuses_other_objects(tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader

    from tsm_surgery.integrations.mmaction.checkpoint import CheckpointLoadError, trusted_resume

    compat.apply()
    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {}, "meta": {"obj": os.stat_result((0,) * 10)}}, path)
    with pytest.raises(CheckpointLoadError, match="evil.pth.*global os.stat_result") as info:
        CheckpointLoader.load_checkpoint(path, map_location="cpu")
    assert info.value.refused_global == "os.stat_result"
    other = str(tmp_path / "other.pth")
    torch.save({"state_dict": {}, "meta": {"obj": os.stat_result((1,) * 10)}}, other)
    with trusted_resume(path):
        assert CheckpointLoader.load_checkpoint(path, map_location="cpu")["meta"]["obj"].st_mode == 0
        with pytest.raises(CheckpointLoadError, match="other.pth"):  # the opt-in covers that one file only
            CheckpointLoader.load_checkpoint(other, map_location="cpu")
    with pytest.raises(CheckpointLoadError):  # the opt-in ends with its block
        CheckpointLoader.load_checkpoint(path, map_location="cpu")


def test_trusted_resume_follows_the_config_key(monkeypatch):
    from mmengine.runner import Runner

    from tsm_surgery.integrations.mmaction.checkpoint import TRUST_ENV, is_trusted

    compat.apply()
    assert getattr(Runner.resume, "_tsm_surgery", False)

    class Probe:
        def __init__(self, cfg):
            self.cfg = cfg

    # Wrap a probe body the way the patch wraps mmengine's Runner.resume: the body runs with the
    # resumed file (and only it) trusted exactly when the config or the environment opts in.
    # (End to end: test_checkpoint_safety.py.)
    seen, saved = [], Runner.resume
    try:
        Runner.resume = lambda self, filename, *a, **k: seen.append((is_trusted(filename), is_trusted("other.pth")))
        compat._trusted_resume()
        Runner.resume(Probe({"trusted_resume": True}), "a.pth")
        Runner.resume(Probe({}), "a.pth")
        Runner.resume._original(Probe({"trusted_resume": True}), "a.pth")  # unpatched: never trusted
        monkeypatch.setenv(TRUST_ENV, "1")
        Runner.resume(Probe({}), "a.pth")
    finally:
        Runner.resume = saved
    assert seen == [(True, False), (False, False), (False, False), (True, False)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patch matters on machines without CUDA")
def test_cpu_distributed_init(monkeypatch):
    import torch.distributed as dist
    from mmengine.dist import utils as dist_utils

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    compat.apply()
    unpatched = dist_utils._init_dist_pytorch._original
    with pytest.raises(Exception):  # noqa: B017 torch.cuda.set_device on a machine without a GPU
        unpatched("gloo")
    assert not dist.is_initialized()
    dist_utils.init_dist("pytorch", backend="nccl")  # nccl is replaced by gloo without CUDA
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()

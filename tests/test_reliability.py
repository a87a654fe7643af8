"""Reliability: atomic outputs, the work-dir lock, exact resume, random-weight notes, smaller guards.

Every test here fails on the code before these guarantees: a failing command with ``--force`` lost
the old outputs, a full disk left a truncated file and a C++ message, two runs shared a work dir, a
resumed run drew other random numbers.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from paper_tsm import PaperMobileNetV2
from utils import TinyNet

from tsm_surgery.cli import main
from tsm_surgery.integrations.outputs import STAGING_PREFIX, OutputWriteError, atomic_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
CLI = [sys.executable, "-m", "tsm_surgery.cli"]


def _leftovers(folder) -> list:
    """Temporary files or folders the atomic writer could have left behind."""
    return [name for name in os.listdir(folder) if name.startswith(STAGING_PREFIX) or ".tmp" in name]


def _disk_full_save(real_save):
    """A torch.save that writes half a file, then fails as a full disk does."""
    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    return save


# -- the facility --------------------------------------------------------------------------------------------------

def test_atomic_outputs_replace_a_set_together_or_not_at_all(tmp_path):
    a, b, stale = tmp_path / "x.onnx", tmp_path / "x.onnx.data", tmp_path / "x.json"
    for path in (a, b, stale):
        path.write_text("old")
    outputs = [(str(a), "graph"), (str(b), "weights"), (str(stale), "sidecar")]
    with pytest.raises(KeyboardInterrupt):
        with atomic_outputs(outputs, force=True) as temps:
            for tmp in temps[:2]:
                with open(tmp, "w") as f:
                    f.write("new")
            assert all(os.path.dirname(t) != str(tmp_path) and os.path.basename(t) == os.path.basename(p)
                       for t, (p, _) in zip(temps, outputs))  # same basenames (ONNX names its .data file)
            raise KeyboardInterrupt
    assert [p.read_text() for p in (a, b, stale)] == ["old"] * 3 and _leftovers(tmp_path) == []
    with atomic_outputs(outputs, force=True) as temps:
        for tmp in temps[:2]:
            with open(tmp, "w") as f:
                f.write("new")
    # The set is replaced together: a member the body did not write does not survive from the old set.
    assert a.read_text() == b.read_text() == "new" and not stale.exists() and _leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="x.onnx already exists"):
        with atomic_outputs(outputs[:1], force=False):
            pass


def test_write_failure_names_the_file_and_the_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "w.pth"
    target.write_bytes(b"old")
    monkeypatch.setattr(torch, "save", _disk_full_save(torch.save))
    with pytest.raises(OutputWriteError, match=r"^cannot write .*w\.pth: no space left on device") as err:
        with atomic_outputs([(str(target), "weights")], force=True) as (tmp,):
            torch.save({"x": torch.zeros(3)}, tmp)
    assert "\n" not in str(err.value) and err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only): a real full disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)  # torch may still hold the failed file


def test_import_checkpoint_on_a_full_disk_keeps_out(tiny_tmpfs, tmp_path, capsys):
    src = tmp_path / "big.pth"
    torch.save(PaperMobileNetV2(n_class=27).state_dict(), src)  # the paper's online layout, 9 MB > the disk
    out = tiny_tmpfs / "out.pth"
    out.write_bytes(b"old")
    assert main(["import-checkpoint", str(src), str(out), "--force"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tsm-surgery import-checkpoint: cannot write ") and "out.pth: no space left on device" in err
    assert "\n" not in err and "inline_container" not in err
    assert out.read_bytes() == b"old" and _leftovers(tiny_tmpfs) == []


# -- every writing verb: a failure with --force keeps the old outputs -----------------------------------------------

def test_convert_failing_with_force_keeps_old_outputs(tmp_path, capsys):
    out, graph = tmp_path / "keep.pt", tmp_path / "keep.py"
    out.write_text("old module")
    graph.write_text("old graph")
    truncated = tmp_path / "truncated.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    assert main(["convert", "timm:resnet18", "--out", str(out), "--graph", str(graph), "--force",
                 "--checkpoint", str(truncated)]) == 1
    assert "truncated.pth" in capsys.readouterr().err
    assert out.read_text() == "old module" and graph.read_text() == "old graph" and _leftovers(tmp_path) == []


def test_convert_full_disk_keeps_old_outputs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "keep.pt"
    out.write_text("old module")
    monkeypatch.setattr(torch, "save", _disk_full_save(torch.save))
    assert main(["convert", "timm:resnet18", "--num-classes", "3", "--out", str(out), "--force"]) == 1
    captured = capsys.readouterr()
    assert "random weights" in captured.err  # item 5: said on stderr
    assert f"cannot write {out}: no space left on device" in captured.err
    assert out.read_text() == "old module" and _leftovers(tmp_path) == []


def test_convert_and_export_from_random_weights_say_so(tmp_path, capsys):
    assert main(["convert", "timm:resnet18", "--num-classes", "3", "--out", str(tmp_path / "m.pt")]) == 0
    assert "no --checkpoint, so the saved module has random weights" in capsys.readouterr().err
    weights = tmp_path / "w.pth"
    torch.save(torch.load(tmp_path / "m.pt", weights_only=False).state_dict(), weights)
    assert main(["convert", "timm:resnet18", "--num-classes", "3", "--checkpoint", str(weights),
                 "--out", str(tmp_path / "m2.pt")]) == 0
    assert "random weights" not in capsys.readouterr().err
    assert main(["export", "--model", "timm:resnet18", "--num-classes", "3", "--offline", "--n-segments", "2",
                 "--size", "32", "--exporter", "legacy", "--output", str(tmp_path / "r.onnx")]) == 0
    assert "no --checkpoint, so the exported network has random weights" in capsys.readouterr().err


def test_export_failing_with_force_keeps_the_old_set(tmp_path, capsys, monkeypatch):
    from tsm_surgery.integrations.export import onnx as export_onnx

    files = [tmp_path / name for name in ("m.onnx", "m.onnx.data", "m.json")]
    for path in files:
        path.write_text(f"old {path.name}")

    def broken(*args, **kwargs):
        with open(args[2], "w") as f:  # a partial graph, then the exporter fails
            f.write("partial")
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(export_onnx, "_export_onnx", broken)
    argv = ["export", "--model", "timm:resnet18", "--num-classes", "3", "--offline", "--n-segments", "2",
            "--size", "32", "--output", str(files[0]), "--force"]
    assert main(argv) == 1 and "exporter failed" in capsys.readouterr().err
    assert [p.read_text() for p in files] == [f"old {p.name}" for p in files] and _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert main(argv[:-1] + ["--exporter", "legacy", "--force"]) == 0
    assert not files[1].exists()  # the legacy exporter writes no .data: the old one does not survive
    assert json.loads(files[2].read_text())["onnx"] == "m.onnx"
    import onnx

    onnx.checker.check_model(str(files[0]))


def test_import_checkpoint_failing_with_force_keeps_out(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src.pth"
    torch.save(PaperMobileNetV2(n_class=27).state_dict(), src)
    out = tmp_path / "out.pth"
    out.write_bytes(b"old")
    monkeypatch.setattr(torch, "save", _disk_full_save(torch.save))
    assert main(["import-checkpoint", str(src), str(out), "--force"]) == 1
    assert "out.pth: no space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_synth_data_failing_with_force_keeps_the_old_data(tmp_path, monkeypatch):
    from tsm_surgery.integrations.demo import synth_data

    out = tmp_path / "data"
    synth_data.generate(out, videos_per_class=3, size=32, frames=8)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def fails_later(path, frames, fps=8):
        calls.append(path)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, frames, fps)

    real = synth_data.write_video
    monkeypatch.setattr(synth_data, "write_video", fails_later)
    with pytest.raises(OSError, match="no space left on device"):
        synth_data.generate(out, videos_per_class=3, size=32, frames=8, seed=1, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and _leftovers(out) == []


def test_demo_failing_with_force_restores_the_previous_run(tmp_path, monkeypatch):
    from tsm_surgery.integrations.demo import pipeline

    run = tmp_path / "run"
    (run / "tsm").mkdir(parents=True)
    (run / "tsm" / "epoch_1.pth").write_text("old checkpoint")
    (run / "summary.json").write_text("old summary")
    (run / "notes.txt").write_text("not the demo's")

    def fail(name, cfg):
        assert not (run / "summary.json").exists()  # the old run is set aside meanwhile
        raise RuntimeError("training failed")

    monkeypatch.setattr(pipeline, "train_and_test", fail)
    with pytest.raises(RuntimeError, match="training failed"):
        pipeline.run_demo(str(run), epochs=1, videos_per_class=3, models=["tsm"], force=True, stream=False)
    assert (run / "summary.json").read_text() == "old summary"
    assert (run / "tsm" / "epoch_1.pth").read_text() == "old checkpoint"
    assert sorted(os.listdir(run)) == ["notes.txt", "summary.json", "tsm"]


# -- import-checkpoint without a model; the num_batches_tracked message ---------------------------------------------

def _mmaction_resnet18_state() -> dict:
    """An MMAction2 ResNetTSM-18 recognizer's state_dict (shift wrappers as '.net'), from torchvision's weights."""
    import re

    import torchvision

    from tsm_surgery.integrations.checkpoints.layouts import tv_to_mm_resnet

    state = {}
    for key, value in torchvision.models.resnet18().state_dict().items():
        if key.startswith("fc."):
            continue
        key = "backbone." + tv_to_mm_resnet(key)
        state[re.sub(r"(layer\d+\.\d+\.conv1\.conv\.)weight$", r"\1net.weight", key)] = value
    state["cls_head.fc_cls.weight"], state["cls_head.fc_cls.bias"] = torch.randn(4, 512), torch.zeros(4)
    return state


def _damaged(state: dict, how: str) -> dict:
    state = dict(state)
    key = "backbone.layer2.0.conv2.conv.weight"
    if how == "nan":
        state[key] = state[key].clone()
        state[key][0, 0, 0, 0] = float("nan")
    elif how == "int32":
        state[key] = state[key].to(torch.int32)
    elif how == "meta":
        state[key] = torch.empty_like(state[key], device="meta")
    elif how == "sparse":
        state[key] = state[key].to_sparse()
    elif how == "complex":
        state[key] = state[key].to(torch.complex64)
    elif how == "extra key":
        state["backbone.layer2.0.extra.weight"] = torch.zeros(3)
    elif how == "missing block":
        state = {k: v for k, v in state.items() if not k.startswith("backbone.layer3.0.")}
    elif how == "missing last block":
        state = {k: v for k, v in state.items() if not k.startswith("backbone.layer3.1.")}
    elif how == "wrong shape":
        state[key] = torch.zeros(128, 128, 1, 1)
    elif how == "norm shapes":
        state["backbone.layer2.0.conv2.bn.running_var"] = torch.ones(64)
    return state


@pytest.mark.parametrize("how, message", [
    ("nan", r"layer2\.0\.conv2\.conv\.weight' holds NaN"), ("int32", r"conv2\.conv\.weight' has dtype int32"),
    ("meta", r"conv2\.conv\.weight' is on the meta device"), ("sparse", r"conv2\.conv\.weight' is a sparse_coo"),
    ("complex", r"conv2\.conv\.weight' is complex"),
    ("extra key", r"1 tensors belong to no ResNet-18 module \(first: \['backbone\.layer2\.0\.extra\.weight"),
    ("missing block", r"tensors of a ResNet-18 are missing \(first: \['backbone\.layer3\.0\."),
    ("missing last block", r"blocks per stage \(2, 2, 1, 2\) are no ResNet depth's"),
    ("wrong shape", r"conv2\.conv\.weight: \(128, 128, 1, 1\) vs \(128, 128, 3, 3\)"),
    ("norm shapes", r"norm layer 'backbone\.layer2\.0\.conv2\.bn' has inconsistent shapes"),
])
def test_import_checkpoint_without_a_model_checks_what_it_can(tmp_path, capsys, how, message):
    import re

    from tsm_surgery.integrations.checkpoints import import_tsm_checkpoint

    good = _mmaction_resnet18_state()
    assert set(import_tsm_checkpoint(good)) == {k.replace(".net.", ".") for k in good}  # the intact one imports
    src, out = tmp_path / "src.pth", tmp_path / "out.pth"
    torch.save({"state_dict": _damaged(good, how)}, src)
    assert main(["import-checkpoint", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith(f"tsm-surgery import-checkpoint: {src}") and not out.exists()


def test_missing_num_batches_tracked_imports(tmp_path):
    import torchvision

    import tsm_surgery
    from tsm_surgery.integrations.checkpoints import import_tsm_checkpoint

    paper = PaperMobileNetV2(n_class=27)
    state = {k: v for k, v in paper.state_dict().items() if not k.endswith("num_batches_tracked")}
    net = tsm_surgery.convert(torchvision.models.mobilenet_v2(num_classes=27), direction="uni", uni_slot="first")
    imported = import_tsm_checkpoint(state, net)  # once: "another depth, width or number of classes"
    net.load_state_dict(imported)
    assert all(torch.equal(v, imported[k]) for k, v in net.state_dict().items())


# -- one OnlineTSM from two threads ----------------------------------------------------------------------------------

_ENTERED, _RELEASE = threading.Event(), threading.Event()  # module level: the model is deep-copied


class _Gate(torch.nn.Module):
    """Holds the first frame inside the network until released (a leaf: kept whole by the tracer)."""

    def forward(self, x):
        _ENTERED.set()
        _RELEASE.wait(timeout=10)
        return x


class _GatedNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(self.gate(x).mean((2, 3)))


def test_one_online_tsm_from_two_threads_is_refused():
    import tsm_surgery

    model = _GatedNet().eval()
    online = tsm_surgery.convert(model, n_segments=4, direction="uni", online=True, leaf_modules=[_Gate])
    frame = torch.randn(1, 3, 8, 8)
    worker = threading.Thread(target=online, args=(frame,))
    worker.start()
    assert _ENTERED.wait(timeout=30)
    try:
        with pytest.raises(RuntimeError, match="one OnlineTSM is being fed from two threads at once"):
            online(frame)
        with pytest.raises(RuntimeError, match=r"reset\(\) was called while another call runs"):
            online.reset()
    finally:
        _RELEASE.set()
        worker.join()
    online(frame)  # released: the object works again, on its one stream
    assert online.state is not None


# -- training: the MMAction2 runner ----------------------------------------------------------------------------------

pytest.importorskip("mmaction")

from utils import make_dataset, write_config  # noqa: E402

from tsm_surgery.integrations.training import runner as api  # noqa: E402
from tsm_surgery.integrations.training.lock import LOCK_NAME, WorkDirLockedError, work_dir_lock  # noqa: E402

EXTRA = """
custom_imports = dict(imports=['tsm_surgery.integrations.mmaction', 'reliability_hooks'], allow_failed_imports=False)
custom_hooks = [dict(type='ClipLengthHook'), dict(type='KillAtIterHook'), dict(type='SleepBeforeTrainHook')]
randomness = dict(seed=0, deterministic=True)
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data = make_dataset(str(tmp_path_factory.mktemp("videos")), per_class=2, frames=8)
    # A quarter-width timm ResNet-18 with dropout: random frame offsets and dropout masks every epoch.
    return write_config(str(tmp_path_factory.mktemp("cfg") / "tiny.py"), data, num_frames=4, backbone="timm",
                        max_epochs=3, extra=EXTRA + "model['cls_head']['dropout_ratio'] = 0.5\n")


def _env(**extra) -> dict:
    # One torch thread, as in this process (conftest): float sums must run in the same order in every run.
    return dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS=str(torch.get_num_threads()), **extra)


def test_training_checkpoint_on_a_full_disk_leaves_no_truncated_file(config, tmp_path, monkeypatch):
    from mmengine.fileio.backends import LocalBackend

    def put(self, obj, filepath):
        with open(filepath, "wb") as f:
            f.write(obj[: len(obj) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(LocalBackend, "put", put)
    work = tmp_path / "w"
    with pytest.raises(OutputWriteError, match=r"epoch_1\.pth: no space left on device"):
        api.train(config, work_dir=str(work), cfg_options={"train_cfg.max_epochs": 1})
    assert not list(work.glob("*.pth")) and _leftovers(work) == []


@pytest.mark.slow  # two real training processes, about a minute on 2 cores
def test_a_second_run_into_a_held_work_dir_stops_naming_the_holder(config, tmp_path):
    work = tmp_path / "w"
    first = subprocess.Popen(CLI + ["train", config, "--work-dir", str(work)],
                             env=_env(TSM_TEST_SLEEP_BEFORE_TRAIN="120"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            lock = work / LOCK_NAME
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break  # the first run holds the lock
            time.sleep(0.2)
        start = time.time()
        second = subprocess.run(CLI + ["train", config, "--work-dir", str(work), "--cfg-options", "randomness.seed=1"],
                                env=_env(), capture_output=True, text=True, timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.startswith("tsm-surgery train:")]
        assert second.returncode == 1 and len(lines) == 1, second.stderr  # (mmcv-lite warns on import)
        assert lines[0].startswith("tsm-surgery train: work dir") and f"PID {first.pid}" in lines[0]
        assert first.poll() is None  # the first run goes on
        print(f"\nsecond run refused in {time.time() - start:.1f} s (process start included)")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with work_dir_lock(str(work)):  # a kill released it
        with pytest.raises(WorkDirLockedError, match=f"PID {os.getpid()}"):
            with work_dir_lock(str(work)):  # a second descriptor, as a second process would hold
                pass


def test_no_resume_advice_loop_when_the_only_checkpoint_is_truncated(config, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, work / "epoch_1.pth")
    (work / "epoch_1.pth").write_bytes((work / "epoch_1.pth").read_bytes()[:300])  # cut mid-write, no last_checkpoint
    with pytest.raises(FileExistsError, match=r"Pass --resume .*epoch_1\.pth \(there is no last_checkpoint\)"):
        api.train(config, work_dir=str(work))
    with pytest.raises(FileNotFoundError, match=r"no last_checkpoint .*--resume .*epoch_1\.pth, or start again "
                                                r"with --overwrite") as bare:
        api.train(config, work_dir=str(work), resume=True)
    assert "without --resume" not in str(bare.value)  # which would send the user back to the first message
    (work / "last_checkpoint").write_text(str(work / "epoch_1.pth"))
    for resume in (True, str(work / "epoch_1.pth")):
        with pytest.raises(ValueError, match=r"epoch_1\.pth: the checkpoint is truncated .*start again with "
                                             r"--overwrite"):
            api.train(config, work_dir=str(work), resume=resume)


def test_refused_pickle_hint_does_not_suggest_resuming_it(tmp_path):
    from tsm_surgery.integrations.checkpoints.loading import CheckpointLoadError, read_checkpoint

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": os.stat_result((0,) * 10)}, evil)
    with pytest.raises(CheckpointLoadError, match="evil.pth.*not loaded") as err:
        read_checkpoint(str(evil))
    assert "--resume" not in str(err.value) and "Never unpickle a file you did not write" in str(err.value)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(config, tmp_path):
    uninterrupted = tmp_path / "a"
    api.train(config, work_dir=str(uninterrupted))
    killed = tmp_path / "b"
    # Epochs have 2 iterations: the kill comes after the first iteration of epoch 3, mid-epoch.
    run = subprocess.run(CLI + ["train", config, "--work-dir", str(killed)], env=_env(TSM_TEST_KILL_AT_ITER="5"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert (killed / "epoch_2.pth").exists() and not (killed / "epoch_3.pth").exists()
    resumed = subprocess.run(CLI + ["train", config, "--work-dir", str(killed), "--resume"], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(uninterrupted / "epoch_3.pth", map_location="cpu", weights_only=False)
    b = torch.load(killed / "epoch_3.pth", map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert different == [], f"{len(different)} tensors differ, first {different[:3]}"

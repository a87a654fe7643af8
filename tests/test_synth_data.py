"""The embedded dataset: real videos through MMAction2's pipeline, the time-reversal pair property,
determinism and refusing to overwrite."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tsm_surgery.integrations.demo import synth_data
from tsm_surgery.integrations.demo.synth_data import CLASSES, PAIRS, generate, render_video, sample_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    meta = generate(out, videos_per_class=5, size=64, frames=16, seed=3)
    return out, meta


def _lines(path):
    return [line.split() for line in Path(path).read_text().splitlines()]


def test_layout_labels_and_splits(small_data):
    out, meta = small_data
    assert (out / "classes.txt").read_text().split() == list(CLASSES)
    assert meta["counts"] == {"train": 18, "val": 6, "test": 6}
    seen = {}
    for split in synth_data.SPLITS:
        for rel, label in _lines(out / f"{split}.txt"):
            assert (out / "videos" / rel).is_file()
            assert rel.split("/")[0] == CLASSES[int(label)]
            seen[rel] = split
    assert len(seen) == 30
    # Both videos of one parameter set (forward and reversed) are in the same split.
    for _pair, fwd, rev in PAIRS:
        for i in range(5):
            assert seen[f"{fwd}/{fwd}_{i:04d}.mp4"] == seen[f"{rev}/{rev}_{i:04d}.mp4"]


def test_videos_decode_through_mmaction_pipeline(small_data):
    """The demo config's own test pipeline (DecordInit ... PackActionInputs) on the real files."""
    from tsm_surgery.integrations.mmaction import compat

    compat.apply()
    from mmaction.datasets import VideoDataset
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope("mmaction")
    out, _ = small_data
    cfg = Config.fromfile(str(REPO / "configs" / "demo" / "_base_demo.py"))
    names = [step["type"] for step in cfg.test_pipeline]
    assert names[:3] == ["DecordInit", "SampleFrames", "DecordDecode"] and names[-1] == "PackActionInputs"
    for pipeline, test_mode in ((cfg.train_pipeline, False), (cfg.test_pipeline, True)):
        dataset = VideoDataset(ann_file=str(out / "test.txt"), data_prefix=dict(video=str(out / "videos")),
                               pipeline=pipeline, test_mode=test_mode)
        assert len(dataset) == 6
        for i in range(len(dataset)):
            sample = dataset[i]
            inputs = sample["inputs"]
            assert tuple(inputs.shape) == (cfg.num_segments, 3, 64, 64)
            assert inputs.dtype.is_floating_point is False
            info = dataset.get_data_info(i)
            assert int(sample["data_samples"].gt_label) == info["label"]
            assert Path(info["filename"]).parent.name == CLASSES[info["label"]]
            assert inputs.float().std() > 5  # real pictures, not blank frames


def test_decoded_reversed_class_is_the_forward_video_backwards(small_data):
    import decord

    out, _ = small_data
    for _pair, fwd, rev in PAIRS:
        for i in (0, 4):
            a = decord.VideoReader(str(out / "videos" / fwd / f"{fwd}_{i:04d}.mp4"))
            b = decord.VideoReader(str(out / "videos" / rev / f"{rev}_{i:04d}.mp4"))
            a = a.get_batch(list(range(len(a)))).asnumpy().astype(np.float32)
            b = b.get_batch(list(range(len(b)))).asnumpy().astype(np.float32)
            assert a.shape == b.shape == (16, 64, 64, 3)
            assert np.abs(a[::-1] - b).mean() < 2.0  # equal up to (near-lossless) compression
            assert np.abs(a - b).mean() > 2.0  # and the order does matter


def test_render_reverse_is_exact_time_reversal():
    for pair in range(len(PAIRS)):
        params = sample_params(pair, np.random.default_rng([7, pair]), 64, 12)
        forward = render_video(params)
        assert forward.shape == (12, 64, 64, 3) and forward.dtype == np.uint8
        np.testing.assert_array_equal(render_video(params, reverse=True), forward[::-1])


def _object_mask(frames):
    return frames.astype(np.float32).mean(-1) > 145


def _trajectory(pair, params, frames):
    """Per-frame quantity whose trend is the class: x centroid, area, or hand angle."""
    masks = _object_mask(frames)
    ys, xs = np.mgrid[:frames.shape[1], :frames.shape[2]]
    out = []
    for m in masks:
        if pair == 0:
            out.append(xs[m].mean())
        elif pair == 1:
            out.append(m.sum())
        else:  # screen angle of the hand about its pin (y points down)
            out.append(np.arctan2(-(ys[m].mean() - params["cy"]), xs[m].mean() - params["cx"]))
    out = np.asarray(out, np.float64)
    if pair == 2:
        out = np.unwrap(out) - out[0]
    return out


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_reversed_forward_class_matches_the_other_class_generator(pair):
    """Independent draws: forward-class videos played backwards look like reversed-class videos
    (same mean trajectory of the drawn object), forward ones do not; every video moves its way."""
    frames, n = 12, 40
    fwd_traj, rev_traj = [], []
    for i in range(n):
        p = sample_params(pair, np.random.default_rng([1, pair, i]), 64, frames)
        fwd_traj.append(_trajectory(pair, p, render_video(p)))
        q = sample_params(pair, np.random.default_rng([2, pair, i]), 64, frames)  # another draw
        rev_traj.append(_trajectory(pair, q, render_video(q, reverse=True)))
    fwd_traj, rev_traj = np.array(fwd_traj), np.array(rev_traj)
    if pair == 2:  # angles: compare the turn relative to the last frame
        fwd_traj = fwd_traj - fwd_traj[:, -1:]
    slope = lambda tr: np.polyfit(np.arange(frames), tr.T, 1)[0]  # noqa: E731
    assert (slope(fwd_traj) > 0).all() and (slope(rev_traj) < 0).all()
    spread = np.abs(fwd_traj[:, -1] - fwd_traj[:, 0]).mean()
    backwards = fwd_traj[:, ::-1].mean(0)
    if pair == 2:
        backwards = (fwd_traj[:, ::-1] - fwd_traj[:, -1:]).mean(0)
        rev_mean = rev_traj.mean(0)
    else:
        rev_mean = rev_traj.mean(0)
    assert np.abs(backwards - rev_mean).max() < 0.2 * spread
    assert np.abs(fwd_traj.mean(0) - rev_mean).max() > 0.6 * spread


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_with_seed(tmp_path):
    generate(tmp_path / "a", videos_per_class=3, size=32, frames=8, seed=5)
    generate(tmp_path / "b", videos_per_class=3, size=32, frames=8, seed=5)
    generate(tmp_path / "c", videos_per_class=3, size=32, frames=8, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        generate(out, videos_per_class=3, size=32, frames=8)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]

    from tsm_surgery.cli import main

    assert main(["synth-data", str(out), "--videos-per-class", "3", "--size", "32", "--frames", "8"]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "train.txt" in err and len(err.strip().splitlines()) == 1
    assert main(["synth-data", str(out), "--videos-per-class", "3", "--size", "32", "--frames", "8", "--force"]) == 0
    assert (out / "mine.txt").read_text() == "keep me"  # --force replaces only generated files
    assert len(_lines(out / "train.txt")) == 6  # 3 per class: one each for train, val, test


@pytest.mark.parametrize("kwargs, match", [(dict(size=33), "even"), (dict(frames=4), "frames"),
                                           (dict(videos_per_class=2), "videos-per-class")])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "x", **kwargs)

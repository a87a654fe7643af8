"""``tsm-surgery synth-data``: the embedded temporal-reasoning video dataset.

Six classes in three pairs. Within a pair the two classes are exact time reversals of each
other: a video of the second class is a video of the first class played backwards, drawn with
the same random parameters. So the *bag* of frames of a pair's two classes has one and the same
distribution, and only the *order* of the frames tells them apart:

========  ===============  ================  ================================================
pair      class (forward)  class (reversed)  what moves
========  ===============  ================  ================================================
move      move_right       move_left         a square or disc slides horizontally
scale     grow             shrink            a disc or square changes size about its centre
rotate    rotate_ccw       rotate_cw         a clock hand (bar with a knob) turns about a pin
========  ===============  ================  ================================================

A 2D network with average consensus (TSN) sees a bag of frames and therefore sits at chance
(50%) within each pair; it still tells the pairs apart, since each pair draws its own shapes.
A network that mixes neighbouring frames (TSM) can learn the direction.

Per video, randomness: background colour, a static background texture, per-frame sensor
noise, object colour and size, start position, speed (or growth / angular rate) and the
object's shape. Videos are written as H.264 mp4 files with every frame an intra frame, so the
codec treats the first and the last frame alike (a keyframe-plus-predicted-frames stream
would make the first frame sharper and leak the direction to a 2D model).

The output directory holds::

    videos/<class>/<class>_0000.mp4 ...
    train.txt  val.txt  test.txt    # MMAction2 VideoDataset lists: "<class>/<file>.mp4 <label>"
    classes.txt                      # one class name a line, line i is label i
    meta.json                        # the generation settings and counts

Example:
    >>> from tsm_surgery.integrations.demo.synth_data import generate
    >>> info = generate("/tmp/tsm_synth", videos_per_class=4, force=True)  # doctest: +SKIP
    >>> info["counts"]  # doctest: +SKIP
    {'train': 12, 'val': 6, 'test': 6}
"""

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tsm_surgery.integrations.outputs import atomic_outputs

__all__ = [
    "CLASSES",
    "PAIRS",
    "SPLITS",
    "generate",
    "render_video",
    "sample_params",
    "write_video",
    ]

# (pair name, class shown forward, class shown reversed)
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("move", "move_right", "move_left"),
    ("scale", "grow", "shrink"),
    ("rotate", "rotate_ccw", "rotate_cw"),
)
CLASSES: tuple[str, ...] = tuple(name for _, fwd, rev in PAIRS for name in (fwd, rev))
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
GENERATED = ("videos", "train.txt", "val.txt", "test.txt", "classes.txt", "meta.json")


def class_of(pair: int, reversed_: bool) -> int:
    """Label of the forward (``reversed_=False``) or reversed class of pair number ``pair``."""
    return 2 * pair + int(reversed_)


def pair_of(label: int) -> tuple[int, bool]:
    """``(pair index, is the reversed class)`` of a label."""
    return label // 2, bool(label % 2)


# --------------------------------------------------------------------------------------------
# Rendering. Everything is drawn in a forward time direction; a reversed class flips the frames.
# --------------------------------------------------------------------------------------------

def sample_params(pair: int, rng: np.random.Generator, size: int, frames: int, motion_scale: float = 1.0,
                  noise_scale: float = 1.0) -> dict:
    """Draws the random parameters of one forward video of pair ``pair``.

    Sizes and speeds scale with ``size`` (tuned at 64 px), and the total motion is spread over
    ``frames`` frames, so any frame count shows the same overall motion.

    Args:
        pair: index into :data:`PAIRS`.
        rng: the video's random generator.
        size: frame height and width in pixels.
        frames: number of frames.
        motion_scale: multiplies the total motion (travel, growth, turn); below 1 the direction
            becomes a subtler cue. 1 is the default data.
        noise_scale: multiplies the per-frame sensor noise.

    Returns:
        A JSON-serialisable dict that :func:`render_video` turns into frames.
    """
    s = size / 64.0
    params = {
        "pair": pair,
        "size": size,
        "frames": frames,
        "background": rng.uniform(10, 90, 3).round(1).tolist(),
        "texture_amp": float(rng.uniform(5, 25)),
        "noise_sigma": float(rng.uniform(2, 8)) * noise_scale,
        "color": rng.uniform(150, 255, 3).round(1).tolist(),
        "texture_seed": int(rng.integers(2**31)),
        "noise_seed": int(rng.integers(2**31)),
    }
    if pair == 0:  # move: travel 22-38 px (at 64 px) left to right
        half = rng.uniform(5, 8) * s
        travel = rng.uniform(22, 38) * s * motion_scale
        x0 = rng.uniform(half + 1, size - half - 1 - travel)
        params.update(shape=str(rng.choice(["square", "disc"])), half=half, x0=x0, x1=x0 + travel,
                      y=rng.uniform(half + 1, size - half - 1))
    elif pair == 1:  # scale: radius grows from 3-7 px to 15-22 px
        r1 = rng.uniform(15, 22) * s
        shape = str(rng.choice(["disc", "square"]))  # drawn before r0: the default data's order
        r0 = rng.uniform(3, 7) * s
        params.update(shape=shape, r0=r0 + (r1 - r0) * (1 - motion_scale), r1=r1,
                      cx=rng.uniform(r1 * 0.7, size - r1 * 0.7), cy=rng.uniform(r1 * 0.7, size - r1 * 0.7))
    elif pair == 2:  # rotate: a hand turns 200-300 degrees counter-clockwise (on screen)
        length = rng.uniform(16, 24) * s
        params.update(length=length, width=rng.uniform(4, 6) * s, angle0=rng.uniform(0, 2 * math.pi),
                      turn=math.radians(rng.uniform(200, 300)) * motion_scale,
                      cx=rng.uniform(length + 2, size - length - 2), cy=rng.uniform(length + 2, size - length - 2))
    else:
        raise ValueError(f"pair index {pair} out of range 0..{len(PAIRS) - 1} (see PAIRS in synth_data.py)")
    return {k: (float(v) if isinstance(v, (np.floating, float)) and not isinstance(v, bool) else v)
            for k, v in params.items()}


def _background(params: dict) -> np.ndarray:
    size = params["size"]
    rng = np.random.default_rng(params["texture_seed"])
    coarse = rng.standard_normal((6, 6, 3)).astype(np.float32)
    import cv2

    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.asarray(params["background"], np.float32) + params["texture_amp"] * texture


def _draw_shape(canvas: np.ndarray, shape: str, cx: float, cy: float, half: float, color) -> None:
    import cv2

    shift = 4  # sub-pixel precision: coordinates in 1/16 px
    scale = 1 << shift
    if shape == "disc":
        cv2.circle(canvas, (round(cx * scale), round(cy * scale)), round(half * scale), color, -1,
                   cv2.LINE_AA, shift)
    else:
        corners = np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half],
                            [cx - half, cy + half]]) * scale
        cv2.fillPoly(canvas, [corners.round().astype(np.int32)], color, cv2.LINE_AA, shift)


def _draw_hand(canvas: np.ndarray, cx: float, cy: float, angle: float, length: float, width: float,
               color) -> None:
    import cv2

    shift = 4
    scale = 1 << shift
    # Screen y points down: a counter-clockwise turn on screen is a growing angle with -sin.
    tip = (cx + length * math.cos(angle), cy - length * math.sin(angle))
    pt = lambda x, y: (round(x * scale), round(y * scale))  # noqa: E731
    cv2.line(canvas, pt(cx, cy), pt(*tip), color, max(1, round(width)), cv2.LINE_AA, shift)
    cv2.circle(canvas, pt(*tip), round(width * 1.1 * scale), color, -1, cv2.LINE_AA, shift)
    dim = tuple(0.6 * c for c in color)
    cv2.circle(canvas, pt(cx, cy), round(width * 0.9 * scale), dim, -1, cv2.LINE_AA, shift)


def render_video(params: dict, reverse: bool = False) -> np.ndarray:
    """Renders a video from :func:`sample_params` output.

    Args:
        params: the video's parameters.
        reverse: play the forward video backwards (the pair's second class). The frames are
            exactly the forward frames in reverse order, noise included.

    Returns:
        ``uint8`` array of shape ``(frames, size, size, 3)``, RGB.
    """
    size, n = params["size"], params["frames"]
    background = _background(params)
    noise = np.random.default_rng(params["noise_seed"]).standard_normal((n, size, size, 3)).astype(np.float32)
    color = tuple(float(c) for c in params["color"])
    out = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        u = t / max(n - 1, 1)  # 0 -> 1 over the video
        canvas = background.copy()
        if params["pair"] == 0:
            x = params["x0"] + u * (params["x1"] - params["x0"])
            _draw_shape(canvas, params["shape"], x, params["y"], params["half"], color)
        elif params["pair"] == 1:
            r = params["r0"] + u * (params["r1"] - params["r0"])
            _draw_shape(canvas, params["shape"], params["cx"], params["cy"], r, color)
        else:
            angle = params["angle0"] + u * params["turn"]
            _draw_hand(canvas, params["cx"], params["cy"], angle, params["length"], params["width"], color)
        canvas += params["noise_sigma"] * noise[t]
        out[t] = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return out[::-1].copy() if reverse else out


def write_video(path: os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """Writes RGB frames as an all-intra H.264 mp4 (PyAV; OpenCV's mp4v as a fallback).

    Every frame is a keyframe so that no frame position gets better quality than another.

    Args:
        path: output file, ending in ``.mp4``.
        frames: ``uint8`` array ``(T, H, W, 3)``, RGB, even H and W.
        fps: frame rate written in the container.
    """
    path = str(path)
    try:
        import av

        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv444p"
            # keyint 1: all intra; qp 8: near lossless; one thread: byte-identical reruns.
            stream.options = {"g": "1", "bf": "0", "qp": "8", "preset": "veryfast", "threads": "1"}
            stream.thread_count = 1
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (ImportError, ValueError) as err:  # no PyAV or no libx264 in this build
        import cv2

        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, frames.shape[2:0:-1])
        if not writer.isOpened():
            raise RuntimeError(f"cannot write {path}: PyAV/libx264 failed ({err}) and OpenCV's mp4v "
                               "writer did not open. Install PyAV: pip install av") from err
        for frame in frames:
            writer.write(frame[..., ::-1])
        writer.release()


# --------------------------------------------------------------------------------------------
# The dataset on disk.
# --------------------------------------------------------------------------------------------

def _split_of(index: int, count: int) -> str:
    n_val = max(1, round(count * SPLIT_FRACTIONS[1]))  # every split gets at least one video per class
    n_train = count - n_val - max(1, round(count * SPLIT_FRACTIONS[2]))
    return "train" if index < n_train else "val" if index < n_train + n_val else "test"


def claim_out_dir(out: Path, force: bool, owned: Sequence[str], hint: str) -> None:
    """Refuses a non-empty ``out`` unless ``force``; removes nothing (the writer replaces ``owned`` when done).

    Args:
        out: the output directory (created by the caller).
        force: replace what a previous run wrote there.
        owned: the file and folder names this writer creates; anything else is left alone.
        hint: what to do instead, appended to the error.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory: {hint}")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; refusing to overwrite it. This command writes "
                                  f"{', '.join(owned)} there, which belong together. Pass --force (force=True) "
                                  f"to replace them (nothing else in {out} is touched), or {hint}")


def check_settings(videos_per_class: int, size: int, frames: int, seed: int) -> None:
    """Raises ValueError, naming the flag, for a setting :func:`generate` cannot use."""
    if size < 32 or size % 2:
        raise ValueError(f"--size {size}: use an even size of at least 32 px (H.264 needs even sizes).")
    if frames < 8:
        raise ValueError(f"--frames {frames}: use at least 8 frames (the demo samples 8 segments).")
    if videos_per_class < 3:
        raise ValueError(f"--videos-per-class {videos_per_class}: use at least 3 (one per split).")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed {seed}: use an integer of 0 or more (numpy seeds are non-negative).")


def generate(out_dir: os.PathLike, videos_per_class: int = 80, size: int = 64, frames: int = 16,
             seed: int = 0, force: bool = False,
             progress: Callable[[int, int], None] | None = None, motion_scale: float = 1.0,
             noise_scale: float = 1.0) -> dict:
    """Generates the dataset: mp4 files plus MMAction2 annotation lists.

    Each pair draws ``videos_per_class`` parameter sets; every parameter set gives one video of
    the forward class and, played backwards, one of the reversed class, so the two classes of a
    pair are exact time reversals of each other. Both videos of a parameter set land in the same
    split. The result is a function of the arguments only (``seed`` included).

    Args:
        out_dir: output directory; must be empty or missing unless ``force``.
        videos_per_class: videos per class; 60% train, 20% val, 20% test.
        size: frame height and width in pixels (even, at least 32).
        frames: frames per video (at least 8).
        seed: random seed.
        force: replace the files a previous run generated in ``out_dir``.
        progress: called as ``progress(done, total)`` after each video.
        motion_scale, noise_scale: a harder variant (see :func:`sample_params`): less motion
            and more noise make the direction harder to read, so accuracy leaves the ceiling.
            The defaults (1) give the demo's data.

    Returns:
        The content of ``meta.json``: settings, class names, counts per split.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``force`` is false.
        ValueError: a size or count out of range.
    """
    check_settings(videos_per_class, size, frames, seed)
    if not (0 < motion_scale <= 1 and noise_scale >= 0):
        raise ValueError(f"motion_scale={motion_scale}, noise_scale={noise_scale}: use 0 < motion_scale <= 1 "
                         "(1 is the default motion) and noise_scale >= 0.")
    out = Path(out_dir)
    claim_out_dir(out, force, GENERATED, "choose an empty OUT_DIR.")
    # Written to temporary paths in OUT_DIR and moved over the old files only when every video is there.
    with atomic_outputs([(str(out / name), name) for name in GENERATED], force=True, folders=True) as temps:
        meta = _generate_into(Path(os.path.dirname(temps[0])), videos_per_class, size, frames, seed, progress,
                              motion_scale, noise_scale)
    return meta


def _generate_into(out: Path, videos_per_class: int, size: int, frames: int, seed: int,
                   progress: Callable[[int, int], None] | None, motion_scale: float, noise_scale: float) -> dict:
    for name in CLASSES:
        (out / "videos" / name).mkdir(parents=True, exist_ok=True)

    lists: dict[str, list[str]] = {split: [] for split in SPLITS}
    total, done = len(CLASSES) * videos_per_class, 0
    for pair in range(len(PAIRS)):
        for index in range(videos_per_class):
            rng = np.random.default_rng([seed, pair, index])
            params = sample_params(pair, rng, size, frames, motion_scale, noise_scale)
            split = _split_of(index, videos_per_class)
            forward = render_video(params)
            for reverse in (False, True):
                label = class_of(pair, reverse)
                rel = f"{CLASSES[label]}/{CLASSES[label]}_{index:04d}.mp4"
                write_video(out / "videos" / rel, forward[::-1] if reverse else forward)
                lists[split].append(f"{rel} {label}")
                done += 1
                if progress:
                    progress(done, total)
    for split, lines in lists.items():
        # Shuffled once with the seed so the file order does not group classes.
        order = np.random.default_rng([seed, 99]).permutation(len(lines))
        (out / f"{split}.txt").write_text("".join(lines[i] + "\n" for i in order))
    (out / "classes.txt").write_text("".join(name + "\n" for name in CLASSES))
    meta = {
        "generator": "tsm_surgery.integrations.demo.synth_data",
        "seed": seed, "videos_per_class": videos_per_class, "size": size, "frames": frames,
        "motion_scale": motion_scale, "noise_scale": noise_scale,
        "classes": list(CLASSES), "pairs": [list(p) for p in PAIRS],
        "counts": {split: len(lines) for split, lines in lists.items()},
        "layout": "videos/<class>/<class>_NNNN.mp4; <split>.txt lines are '<relative path> <label>' "
                  "for MMAction2's VideoDataset with data_prefix=dict(video='<OUT_DIR>/videos')",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta

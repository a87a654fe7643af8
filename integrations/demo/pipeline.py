"""``tsm-surgery demo``: TSN vs TSM on the embedded time-reversal videos, then streaming.

The main job, end to end on CPU with MMAction2's own pieces:

1. ``synth-data``: writes the six-class time-reversal dataset (real mp4 files plus
   VideoDataset lists) into ``RUN_DIR/data``.
2. Trains three recognizers from ``configs/demo/`` with mmengine's ``Runner``: TSN (a timm
   ResNet-18, average consensus), TSM (the same network through ``TSMSurgeryBackbone``) and a
   uni-directional TSM (causal, streamable). Only the backbone differs.
3. Tests them on the test split: top-1 overall, per pair (6-way top-1 on the pair's videos)
   and *within* each pair (which of the pair's two classes scores higher; chance is 50%).
4. Writes ``RUN_DIR/curves.png`` (training loss and validation top-1 per epoch) and
   ``RUN_DIR/summary.json`` (every number printed).
5. Streams one test video frame by frame through the online form of the uni TSM
   (``tsm_surgery.to_online``) and prints the prediction after each frame.

Work directories are never overwritten: without ``--out-dir`` every run gets a fresh
``work_dirs/demo/<YYYYmmdd-HHMMSS>``; an explicit ``--out-dir`` that is not empty is refused
unless ``--force``.

Example:
    tsm-surgery demo                       # about 10 minutes on 2 CPU cores
    tsm-surgery demo --epochs 2 --videos-per-class 20 --out-dir /tmp/demo --force
"""

import contextlib
import importlib.resources
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tsm_surgery.integrations.mmaction import compat
from tsm_surgery.integrations.outputs import set_aside_outputs

from . import synth_data
from .report import format_table, plot_curves, stream_video

__all__ = ["MODELS_TRAINED", "TimeReversalPairMetric", "DemoProgressHook", "config_path", "run_demo",
           "stream_video"]

compat.apply()

from mmaction.registry import HOOKS, METRICS  # noqa: E402
from mmengine.evaluator import BaseMetric  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

# name -> (config file in configs/demo, what it is)
MODELS_TRAINED = {
    "tsn": ("tsn_r18w32_1x1x8_demo.py", "TSN: 2D ResNet-18, average consensus"),
    "tsm": ("tsm_r18w32_1x1x8_demo.py", "TSM: the same ResNet-18, bi-directional shift"),
    "tsm-uni": ("tsm-uni_r18w32_1x1x8_demo.py", "TSM uni: past-only shift, runs online"),
}
DEFAULT_EPOCHS = 12


def config_path(name: str, config_dir: os.PathLike | None = None) -> Path:
    """Path of a demo model's config (``tsn``, ``tsm`` or ``tsm-uni``).

    Args:
        name: a key of :data:`MODELS_TRAINED`.
        config_dir: folder with the demo configs; default ``$TSM_DEMO_CONFIGS``, else the
            installed package data ``tsm_surgery.configs/demo`` (``configs/demo`` of the source tree).

    Raises:
        FileNotFoundError: the config is not there, with the folder that was searched.
    """
    if config_dir is None:
        config_dir = os.environ.get("TSM_DEMO_CONFIGS") or _packaged_configs() / "demo"
    path = Path(config_dir) / MODELS_TRAINED[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"demo config {path} not found. Hint: pass --config-dir (or set $TSM_DEMO_CONFIGS) "
                                "to a folder holding the demo configs.")
    return path


def _packaged_configs() -> Path:
    try:
        folder = importlib.resources.files("tsm_surgery.configs")
    except ModuleNotFoundError:
        raise FileNotFoundError("the package data tsm_surgery.configs is not installed. Hint: reinstall "
                                "(pip install -e . in a checkout, or make setup) or pass --config-dir.") from None
    return Path(str(folder))  # a folder on disk: setuptools installs package data unzipped


# --------------------------------------------------------------------------------------------
# mmengine pieces: the per-pair metric and a quiet progress hook that records the curves.
# --------------------------------------------------------------------------------------------

@METRICS.register_module()
class TimeReversalPairMetric(BaseMetric):
    """Top-1 per time-reversal pair of the embedded data.

    Labels ``2p`` and ``2p+1`` form pair ``p`` (:data:`synth_data.PAIRS`). Reports, with the
    prefix ``pair/``: ``top1`` (6-way, all videos), ``<pair>_top1`` (6-way, that pair's videos)
    and ``<pair>_within`` (that pair's videos, deciding only between its two classes: 50% is
    chance, what a bag-of-frames model gets).

    Example:
        >>> test_evaluator = [dict(type='AccMetric'), dict(type='TimeReversalPairMetric')]
    """

    default_prefix = "pair"

    def __init__(self, pairs: Sequence[str] = tuple(p[0] for p in synth_data.PAIRS), **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs = list(pairs)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            score = sample["pred_score"]
            label = sample["gt_label"]
            self.results.append((np.asarray(score.detach().cpu(), np.float64), int(label.reshape(-1)[0])))

    def compute_metrics(self, results: list) -> dict[str, float]:
        scores = np.stack([r[0] for r in results])
        labels = np.array([r[1] for r in results])
        metrics = {"top1": float((scores.argmax(1) == labels).mean())}
        for p, name in enumerate(self.pairs):
            mask = labels // 2 == p
            if not mask.any():
                continue
            s, y = scores[mask], labels[mask]
            metrics[f"{name}_top1"] = float((s.argmax(1) == y).mean())
            within = np.where(s[:, 2 * p + 1] > s[:, 2 * p], 2 * p + 1, 2 * p)
            metrics[f"{name}_within"] = float((within == y).mean())
            metrics[f"{name}_n"] = int(mask.sum())
        return metrics


@HOOKS.register_module()
class DemoProgressHook(Hook):
    """Prints one short line per epoch (and a heartbeat within it) and records the curves.

    Args:
        tag: the model's name in the printed lines.
        every: print a heartbeat every this many training iterations (0: never).

    Attributes:
        curves: ``{'train_loss': [(epoch_float, loss)], 'val_top1': [(epoch, top1)]}``.
    """

    priority = "LOW"

    def __init__(self, tag: str = "", every: int = 0) -> None:
        self.tag, self.every = tag, every
        self.curves: dict[str, list] = {"train_loss": [], "val_top1": []}
        self._epoch_start = time.time()
        self._losses: list[float] = []

    def before_train_epoch(self, runner) -> None:
        self._epoch_start = time.time()
        self._losses = []

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        loss = float(outputs["loss"].detach() if torch.is_tensor(outputs["loss"]) else outputs["loss"]) \
            if outputs and "loss" in outputs else float("nan")
        self._losses.append(loss)
        n = len(runner.train_dataloader)
        self.curves["train_loss"].append((runner.epoch + (batch_idx + 1) / n, loss))
        if self.every and (batch_idx + 1) % self.every == 0 and batch_idx + 1 < n:
            print(f"  [{self.tag}] epoch {runner.epoch + 1}/{runner.max_epochs} iter {batch_idx + 1}/{n} "
                  f"loss {np.mean(self._losses[-self.every:]):.3f}", flush=True)

    def after_val_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        if not runner.train_loop or (runner.epoch == 0 and not self._losses):
            return
        top1 = (metrics or {}).get("acc/top1", float("nan"))
        self.curves["val_top1"].append((runner.epoch, float(top1)))
        print(f"  [{self.tag}] epoch {runner.epoch}/{runner.max_epochs}  train loss {np.mean(self._losses):.3f}  "
              f"val top-1 {100 * top1:5.1f}%  ({time.time() - self._epoch_start:.0f} s)", flush=True)


# --------------------------------------------------------------------------------------------
# Training and testing one model.
# --------------------------------------------------------------------------------------------

def build_cfg(name: str, data_root: Path, work_dir: Path, epochs: int, seed: int,
              config_dir: os.PathLike | None = None, batch_size: int | None = None):
    """Loads a demo config and points it at ``data_root`` and ``work_dir``.

    Returns:
        The mmengine ``Config``, with the per-pair metric added to the test evaluator.
    """
    from tsm_surgery.integrations.training.runner import load_config

    # The project's runner API: clip length synced from the pipeline, gloo without CUDA.
    cfg = load_config(str(config_path(name, config_dir)), work_dir=str(work_dir))
    for split in ("train", "val", "test"):
        dataset = cfg[f"{split}_dataloader"]["dataset"]
        dataset["ann_file"] = str(data_root / f"{split}.txt")
        dataset["data_prefix"] = dict(video=str(data_root / "videos"))
        if batch_size:
            cfg[f"{split}_dataloader"]["batch_size"] = batch_size
    cfg.train_cfg.max_epochs = epochs
    for scheduler in cfg.param_scheduler:  # the cosine phase follows the epoch count
        if scheduler["type"] == "CosineAnnealingLR":
            scheduler["T_max"] = max(epochs - 1, 1)
            scheduler["end"] = max(epochs, 2)
    cfg.randomness = dict(seed=seed)
    cfg.test_evaluator = [dict(type="AccMetric"), dict(type="TimeReversalPairMetric")]
    cfg.log_level = "ERROR"  # the progress hook prints the lines that matter
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=epochs, max_keep_ckpts=1,
                                        save_last=True)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=50)
    cfg.visualizer = dict(type="ActionVisualizer", vis_backends=[dict(type="LocalVisBackend")],
                          name=f"demo-{name}-{time.time_ns()}")
    return cfg


def train_and_test(name: str, cfg) -> dict:
    """Trains one demo model with mmengine's Runner and tests it.

    Returns:
        ``{'runner', 'curves', 'test' (metrics), 'train_s', 'test_s'}``.
    """
    from tsm_surgery.integrations.training.runner import build_runner

    hook = DemoProgressHook(tag=name, every=0)
    runner = build_runner(cfg)  # mmengine's Runner.from_cfg plus the checkpoint-key check
    runner.register_hook(hook, priority="LOW")
    start = time.time()
    runner.train()
    train_s = time.time() - start
    start = time.time()
    metrics = runner.test()
    return {"runner": runner, "curves": hook.curves, "test": dict(metrics), "train_s": train_s,
            "test_s": time.time() - start}


def _prepare_run_dir(out_dir: str | None, force: bool) -> Path:
    if out_dir is None:
        run_dir = Path("work_dirs/demo") / time.strftime("%Y%m%d-%H%M%S")
        while run_dir.exists():
            run_dir = run_dir.with_name(run_dir.name + "x")
    else:
        run_dir = Path(out_dir)
        synth_data.claim_out_dir(run_dir, force, ["data", "curves.png", "summary.json", *MODELS_TRAINED],
                                 "leave --out-dir out to get a fresh work_dirs/demo/<timestamp>.")  # removes nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_demo(out_dir: str | None = None, epochs: int = DEFAULT_EPOCHS, videos_per_class: int = 80,
             frames: int = 16, size: int = 64, seed: int = 0, models: Sequence[str] = tuple(MODELS_TRAINED),
             force: bool = False, config_dir: str | None = None, batch_size: int | None = None,
             stream: bool = True) -> dict:
    """Runs the whole demo; returns the summary (also written to ``RUN_DIR/summary.json``).

    Args:
        out_dir: the run directory; default a fresh ``work_dirs/demo/<timestamp>``.
        epochs: training epochs per model.
        videos_per_class, frames, size, seed: passed to :func:`synth_data.generate`; ``seed``
            also seeds training.
        models: which of ``tsn``, ``tsm``, ``tsm-uni`` to train (streaming needs ``tsm-uni``).
        force: replace what a previous demo wrote into ``out_dir``.
        config_dir: folder of the demo configs (default ``configs/demo``).
        batch_size: override the configs' batch size.
        stream: stream one test video through the online uni TSM at the end.
    """
    unknown = [m for m in models if m not in MODELS_TRAINED]
    if unknown:
        raise ValueError(f"--models {','.join(unknown)}: choose from {', '.join(MODELS_TRAINED)}.")
    for name in models:
        config_path(name, config_dir)  # fail before generating data
    wall = time.time()
    run_dir = _prepare_run_dir(out_dir, force)
    owned = ["data", "curves.png", "summary.json", *MODELS_TRAINED]
    # An explicit --out-dir --force: the previous run's files are set aside, and come back if this one fails.
    replacing = set_aside_outputs([(str(run_dir / name), name) for name in owned], force) if out_dir is not None \
        else contextlib.nullcontext()
    with replacing:
        data_root = run_dir / "data"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"tsm-surgery demo: run directory {run_dir}  (torch threads: {torch.get_num_threads()}, "
              f"cores: {os.cpu_count()}, load average: {load:.1f})", flush=True)

        print(f"[1/4] generating {6 * videos_per_class} videos ({size}x{size} px, {frames} frames, seed {seed}) "
              f"into {data_root}", flush=True)
        start = time.time()
        meta = synth_data.generate(data_root, videos_per_class=videos_per_class, size=size, frames=frames, seed=seed)
        print(f"      done in {time.time() - start:.0f} s: " + ", ".join(f"{k} {v}" for k, v in meta["counts"].items()),
              flush=True)

        results: dict[str, dict] = {}
        for i, name in enumerate(models):
            print(f"[2/4] training {name} ({i + 1}/{len(models)}): {MODELS_TRAINED[name][1]}; {epochs} epochs",
                  flush=True)
            cfg = build_cfg(name, data_root, run_dir / name, epochs, seed, config_dir, batch_size)
            results[name] = train_and_test(name, cfg)
            m = results[name]["test"]
            train_s = results[name]["train_s"]
            print(f"      {name}: test top-1 {100 * m['pair/top1']:.1f}%  (train {train_s:.0f} s)", flush=True)

        print("[3/4] test split results", flush=True)
        print(format_table(results), flush=True)
        plot_curves(results, run_dir / "curves.png")
        print(f"      curves: {run_dir / 'curves.png'}", flush=True)

        streamed = None
        if stream and "tsm-uni" in results:
            print("[4/4] streaming one test video frame by frame through the online uni TSM", flush=True)
            streamed = _stream_one(results["tsm-uni"]["runner"], seed)
        elif stream:
            print("[4/4] streaming skipped: tsm-uni was not trained", flush=True)

        summary = {
            "run_dir": str(run_dir), "wall_s": round(time.time() - wall, 1), "epochs": epochs, "seed": seed,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_at_start": load, "data": meta,
            "models": {name: {"config": str(config_path(name, config_dir)), "test": res["test"],
                              "train_s": round(res["train_s"], 1), "test_s": round(res["test_s"], 1),
                              "val_top1_per_epoch": [v for _, v in res["curves"]["val_top1"]]}
                       for name, res in results.items()},
            "stream": streamed,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary: {run_dir / 'summary.json'}; total {summary['wall_s']:.0f} s", flush=True)
        return summary


def _stream_one(runner, seed: int) -> dict:
    dataset = runner.test_dataloader.dataset
    # A reversed-class video of the rotate pair: the hardest to tell from its bag of frames.
    target = synth_data.CLASSES.index("rotate_cw")
    index = next((i for i in range(len(dataset)) if dataset.get_data_info(i)["label"] == target), 0)
    sample = dataset[index]
    model = runner.model
    batch = model.data_preprocessor({"inputs": [sample["inputs"]], "data_samples": [sample["data_samples"]]},
                                    training=False)
    inputs = batch["inputs"][0]  # (T, C, H, W)
    label = int(sample["data_samples"].gt_label)
    result = stream_video(model, inputs)
    video = dataset.get_data_info(index)["filename"]
    print(f"      video {video} (true class {synth_data.CLASSES[label]}), {inputs.shape[0]} frames"
          f"{'' if result['online'] else '  [offline uni network on growing prefixes: to_online unavailable]'}",
          flush=True)
    for step in result["per_frame"]:
        print(f"      frame {step['frame']}: this frame alone -> {synth_data.CLASSES[step['frame_top']]:<11} "
              f"frames 0..{step['frame']} -> {synth_data.CLASSES[step['running_top']]:<11} "
              f"p={step['running_prob']:.2f}", flush=True)
    print(f"      online vs offline uni network on the whole clip: max |logit diff| = "
          f"{result['max_abs_diff_vs_offline']:.2e}", flush=True)
    result.update(video=video, label=label)
    return result

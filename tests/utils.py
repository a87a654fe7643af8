"""Helpers shared by the tests: a tiny residual network, and tiny real videos with a config for them.

Videos are real mp4 files (PyAV, through the demo's writer): a bright square that moves right
(class 0) or left (class 1). The MMAction2 tests read them back with MMAction2's own pipeline.
"""

import os
import textwrap

import numpy as np
import torch
from torch import nn

from tsm_surgery.integrations.models.norms import randomize_norms

__all__ = ["randomize_norms", "TinyNet", "write_video", "make_dataset", "write_config"]


class TinyNet(nn.Module):
    """A stem and two residual blocks; ``norm`` picks BatchNorm or GroupNorm (per-sample, for DDP)."""

    def __init__(self, width=16, classes=5, norm="batch"):
        super().__init__()

        def make_norm():
            return nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(4, width)

        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), make_norm(), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1), make_norm())
            for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def write_video(path: str, direction: int, frames: int = 8, size: int = 32, seed: int = 0) -> None:
    """Writes an mp4 of a square moving right (direction=+1) or left (-1)."""
    rng = np.random.default_rng(seed)
    start = int(rng.integers(2, size // 4))
    y = int(rng.integers(4, size - 12))
    video = np.full((frames, size, size, 3), 20, np.uint8)
    for t in range(frames):
        x = start + 2 * t if direction > 0 else size - 10 - start - 2 * t
        video[t, y:y + 8, max(x, 0):max(x, 0) + 8] = 230
    from tsm_surgery.integrations.demo import synth_data

    synth_data.write_video(path, video)


def make_dataset(root: str, per_class: int = 4, frames: int = 8, size: int = 32) -> str:
    """Writes videos/ and train.txt, val.txt, test.txt (``name label`` lines) under ``root``."""
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    lines = []
    for i in range(per_class):
        for label, direction in ((0, 1), (1, -1)):
            name = f"clip{label}_{i}.mp4"
            write_video(os.path.join(root, "videos", name), direction, frames, size, seed=i)
            lines.append(f"{name} {label}")
    for split in ("train", "val", "test"):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def write_config(path: str, data_root: str, num_frames: int = 4, backbone: str = "mmaction",
                 max_epochs: int = 2, size: int = 32, extra: str = "") -> str:
    """Writes a tiny TSM config (ResNet-18 at ``size`` px) that inherits MMAction2's runtime."""
    backbones = {
        "mmaction": "dict(type='ResNet', depth=18, norm_eval=False)",
        "timm": "dict(type='timm.resnet18', pretrained=False, channels=(16, 32, 64, 128), stem_width=16, "
                "zero_init_last=False)",
    }
    channels = {"mmaction": 512, "timm": 128}[backbone]
    text = f"""
    _base_ = ['mmaction::_base_/default_runtime.py']
    custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)
    data_root = {data_root!r}
    model = dict(
        type='Recognizer2D',
        backbone=dict(type='TSMSurgeryBackbone', backbone={backbones[backbone]}, num_segments=8,
                      shift_div=8, example_input_size={size}),
        cls_head=dict(type='TSMHead', num_classes=2, in_channels={channels}, num_segments=8,
                      dropout_ratio=0.0, init_std=0.01, average_clips='prob'),
        data_preprocessor=dict(type='ActionDataPreprocessor', mean=[127.5] * 3, std=[64.0] * 3,
                               format_shape='NCHW'))
    train_pipeline = [
        dict(type='DecordInit'),
        dict(type='SampleFrames', clip_len=1, frame_interval=1, num_clips={num_frames}),
        dict(type='DecordDecode'),
        dict(type='Resize', scale=({size}, {size}), keep_ratio=False),
        dict(type='FormatShape', input_format='NCHW'),
        dict(type='PackActionInputs'),
    ]
    test_pipeline = [
        dict(type='DecordInit'),
        dict(type='SampleFrames', clip_len=1, frame_interval=1, num_clips={num_frames}, test_mode=True),
        dict(type='DecordDecode'),
        dict(type='Resize', scale=({size}, {size}), keep_ratio=False),
        dict(type='FormatShape', input_format='NCHW'),
        dict(type='PackActionInputs'),
    ]
    def _loader(split, pipeline, shuffle):
        return dict(batch_size=2, num_workers=0, persistent_workers=False,
                    sampler=dict(type='DefaultSampler', shuffle=shuffle),
                    dataset=dict(type='VideoDataset', ann_file=data_root + '/' + split + '.txt',
                                 data_prefix=dict(video=data_root + '/videos'), pipeline=pipeline,
                                 test_mode=not shuffle))
    train_dataloader = _loader('train', train_pipeline, True)
    val_dataloader = _loader('val', test_pipeline, False)
    test_dataloader = _loader('test', test_pipeline, False)
    del _loader
    val_evaluator = dict(type='AccMetric')
    test_evaluator = val_evaluator
    train_cfg = dict(type='EpochBasedTrainLoop', max_epochs={max_epochs}, val_begin=1, val_interval=1)
    val_cfg = dict(type='ValLoop')
    test_cfg = dict(type='TestLoop')
    optim_wrapper = dict(constructor='TSMSurgeryOptimWrapperConstructor', paramwise_cfg=dict(fc_lr5=True),
                         optimizer=dict(type='SGD', lr=0.002, momentum=0.9, weight_decay=1e-4))
    param_scheduler = []
    default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, save_best=None))
    custom_hooks = [dict(type='ClipLengthHook')]
    randomness = dict(seed=0)
    """
    with open(path, "w") as f:
        f.write(textwrap.dedent(text) + textwrap.dedent(extra))
    return path

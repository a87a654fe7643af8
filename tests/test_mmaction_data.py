"""The tiny real videos and configs of tests/utils.py decode with MMAction2's own pipeline
(DecordInit, SampleFrames, DecordDecode): a bright square that moves right (class 0) or left (class 1).
"""

import os

import numpy as np
import pytest

pytest.importorskip("mmaction")
av = pytest.importorskip("av")

from utils import make_dataset  # noqa: E402

import tsm_surgery.integrations.mmaction  # noqa: E402,F401


def test_videos_decode_with_mmaction_pipeline(tmp_path):
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope

    init_default_scope("mmaction")
    root = make_dataset(str(tmp_path), per_class=1, frames=8)
    pipeline = Compose([
        dict(type="DecordInit"),
        dict(type="SampleFrames", clip_len=1, frame_interval=1, num_clips=4, test_mode=True),
        dict(type="DecordDecode"),
        dict(type="FormatShape", input_format="NCHW"),
        dict(type="PackActionInputs"),
    ])
    out = pipeline(dict(filename=os.path.join(root, "videos", "clip0_0.mp4"), label=0, start_index=0,
                        modality="RGB"))
    inputs = out["inputs"]
    assert tuple(inputs.shape) == (4, 3, 32, 32)
    # The square moves right: its mean column grows from frame to frame.
    bright = inputs.float().mean(1) > 128
    cols = [float(np.nonzero(bright[t].numpy())[1].mean()) for t in range(4)]
    assert cols == sorted(cols) and cols[-1] - cols[0] > 4

"""``tsm-surgery bench``: the shift's cost, side by side with the 2D network and the peers.

One process builds, from one set of 2D weights, the plain network, an A/A copy of it, the
converted one, MMAction2's ``ResNetTSM`` and the paper's zero-fill shift (:mod:`.peers`), and
measures (:mod:`.running`, with the tools of :mod:`.measure`):

* op-level shift cost: for every shift site, the minimum over ``--op-repeats`` runs of that
  site's shift on its real input, summed over the sites, as a fraction of the minimum 2D
  forward; eager, and with each site's shift compiled by ``torch.compile``; per site the
  shifts and a ``clone`` of the input (the floor) are timed in turns, so their ratios compare
  the same moments;
* eval latency and a training step (forward + backward), as paired interleaved ratios: every
  round runs each model once in a shuffled order and the ratio is taken within the round;
* peak memory of a training step;
* the online per-frame step of the uni-directional network against the 2D single frame;
* ``convert()`` time; on CUDA also the eval throughput at a batch that fills the GPU.

:mod:`.headline` holds the one :data:`TARGETS` table that both the headline table and the
verdicts read; :mod:`.report` writes the Markdown (``--output``, ``BENCHMARKS.md`` by default),
one section per device. ``--quick`` is a small, fast configuration for tests and CI.

Example:
    >>> from tsm_surgery.integrations.studies.bench import Settings, run_bench, render
    >>> result = run_bench(Settings(model="torchvision:resnet18", frames=4, eval_size=32, train_size=32,
    ...                             online_size=32, rounds=2, op_repeats=2, compile=False, profile=False,
    ...                             convert_model="torchvision:resnet18", convert_repeats=1))
    >>> "## Headline" in render(result)
    True
"""

from .headline import TARGETS, Figure, Target, figures, verdict
from .measure import (
    CONTROL,
    LiveTensorBytes,
    clock_for,
    count_packs,
    cuda_time,
    faulted_mib,
    interleaved_min_times,
    keep_freed_memory,
    min_time,
    paired_ratios,
    peak_bytes,
    wall_time,
)
from .peers import ZeroFillShift
from .report import merge_sections, render
from .running import BenchResult, Settings, run_bench

__all__ = [
    "Settings", "run_bench", "BenchResult", "render", "merge_sections",
    "TARGETS", "Target", "Figure", "figures", "verdict",
    "CONTROL", "paired_ratios", "min_time", "interleaved_min_times", "wall_time", "cuda_time", "clock_for",
    "peak_bytes", "LiveTensorBytes", "count_packs", "keep_freed_memory", "faulted_mib", "ZeroFillShift",
]

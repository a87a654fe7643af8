"""``tsm-surgery coverage``: convert timm and torchvision models and report what works, and how much.

For every model of the sweep (by default the smallest model of every timm family, i.e. every
timm model module, plus the smallest of every torchvision classification family; with
``--all`` every timm name up to a parameter limit) the check runs these steps in order:

* ``build``: the model at the smallest square input it accepts, norms randomised;
* ``sites``: the graph traces and its joins are classified (networks without residual joins
  get the ``block_entry`` policy);
* ``bi``: ``convert(direction="bi")`` runs and changes the output (effective);
* ``online``: ``convert(direction="uni")`` runs and its streaming form, run frame by frame,
  equals the offline network;
* ``blocks``: how many blocks were shifted and how many kept whole, with the reason;
* ``backward``: a train-mode forward and backward of the bi network gives finite gradients.

A model *passes* when bi, uni and online hold and it shifts at least as many blocks as it
keeps whole; it is *partial* when most blocks are kept whole. Each model runs in a worker
process with a time limit, so a crash or a hang costs one row, not the sweep.

Modules: ``specs`` (which models), ``check`` (one model), ``blocks`` (the block count),
``pool`` (workers), ``report`` (JSON and markdown), ``cli`` (the command).

Example:
    tsm-surgery coverage                         # the default sweep, writes COVERAGE.md
    tsm-surgery coverage --models 'resnet*' --limit 3 --out /tmp/cov.md
    tsm-surgery coverage --all --max-params 40   # resumable; writes COVERAGE_ALL.md
"""

from .blocks import Blocks, count_blocks
from .check import Result, check_model
from .report import (
    Meta,
    Report,
    load_report,
    render_markdown,
    save_report,
    summarize,
)
from .specs import FAMILY_KINDS, ModelSpec, all_timm_specs, sweep_specs

__all__ = [
    "check_model", "count_blocks", "sweep_specs", "all_timm_specs", "summarize",
    "render_markdown", "load_report", "save_report", "ModelSpec", "Result", "Blocks", "Meta", "Report",
    "FAMILY_KINDS",
]

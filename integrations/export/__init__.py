"""Exported forms of a TSM network for CPU runtimes, and the runner that streams them.

* :mod:`.onnx`, :mod:`.openvino`, :mod:`.executorch`: one module per target, each with
  ``export_online`` (the step: frame and caches in, output and caches out), ``export_offline``
  (the clip network), ``write`` (any module on example inputs) and ``output_files``;
* :mod:`.writer`: :func:`export_set`, a target's artifact and its JSON sidecar, all or nothing, and
  :func:`export_int8_set`, the same for a static int8 network (:mod:`.int8`);
* :mod:`.artifacts`: the sidecar, staged writing, the extra each target needs;
* :mod:`.runtime`: :func:`load` a sidecar into an ``OnlineRunner`` (``step(frame) -> logits``)
  or a ``ClipRunner``, in onnxruntime, OpenVINO or ExecuTorch.
"""

from .artifacts import SIDECAR_FORMAT, TARGETS, read_sidecar
from .onnx import export_offline, export_online, output_files
from .runtime import ClipRunner, OnlineRunner, load, open_engine
from .writer import SUFFIX, export_int8_set, export_set, target_module

__all__ = ["export_online", "export_offline", "output_files", "SIDECAR_FORMAT", "TARGETS", "read_sidecar",
           "export_set", "export_int8_set", "target_module", "SUFFIX", "load", "open_engine", "OnlineRunner",
           "ClipRunner"]

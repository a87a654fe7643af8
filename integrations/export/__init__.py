"""Exported forms of a TSM network for other runtimes.

* :mod:`.onnx`: the online step (caches in, caches out) and the clip network as ONNX, with a
  JSON sidecar.
"""

from .onnx import SIDECAR_FORMAT, export_offline, export_online, output_files

__all__ = ["export_online", "export_offline", "output_files", "SIDECAR_FORMAT"]

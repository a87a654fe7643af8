"""The 0.1 name of :mod:`._graph_module`, kept for one release: networks pickled by 0.1 refer to it."""

from ._graph_module import _restore

__all__ = ["_restore"]

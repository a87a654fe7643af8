"""Helpers shared by the tests."""

from tsm_surgery.integrations.norms import randomize_norms

__all__ = ["randomize_norms"]

"""The examples in the core's docstrings run and print what they claim."""

import doctest
import importlib

import pytest

CORE_MODULES = ["tsm_surgery", "tsm_surgery._shift", "tsm_surgery._recompute", "tsm_surgery._sites",
                "tsm_surgery._convert", "tsm_surgery._tracer", "tsm_surgery.integrations.models",
                "tsm_surgery.integrations.models.norms"]


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0

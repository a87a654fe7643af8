"""The examples in the core's docstrings run and print what they claim.

Every module of ``tsm_surgery`` is collected (a new one is checked without being listed); a
module either has examples or is named in ``WITHOUT_EXAMPLES``, so the suite cannot pass by
collecting none.
"""

import doctest
import importlib
import pkgutil

import pytest

import tsm_surgery

CORE_MODULES = ["tsm_surgery"] + sorted(f"tsm_surgery.{m.name}" for m in pkgutil.iter_modules(tsm_surgery.__path__))
INTEGRATION_MODULES = ["tsm_surgery.integrations.models.norms",
                       "tsm_surgery.integrations.models.specs"]
# Internal plumbing without a public entry point of its own; its behaviour is tested in tests/.
WITHOUT_EXAMPLES = {"tsm_surgery._aliasing", "tsm_surgery._graph", "tsm_surgery._graph_module", "tsm_surgery._index",
                    "tsm_surgery._no_residual", "tsm_surgery.cli"}


@pytest.mark.parametrize("name", CORE_MODULES + INTEGRATION_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name in WITHOUT_EXAMPLES:
        assert result.attempted == 0, f"{name} has examples now: remove it from WITHOUT_EXAMPLES"
    else:
        assert result.attempted > 0, f"no docstring example collected from {name}"


def test_every_core_module_is_collected():
    assert len(CORE_MODULES) > 10 and {"tsm_surgery._online", "tsm_surgery._online_graph"} <= set(CORE_MODULES)

import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("mmaction") is not None:
    # mmaction2 1.2.0 imports only after the compat patches; apply them before any test module
    # imports mmaction itself, whatever order the import sorter gives that module's imports.
    from tsm_surgery.integrations.mmaction import compat

    compat.apply()

# Two cores are shared by pytest-xdist workers: one torch thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("TSM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _loggers_on_open_streams():
    """mmengine's loggers keep the stream that was ``sys.stdout`` when they were made; under pytest
    that is an earlier test's capture, closed after it. Point such handlers at this test's stream."""
    logging = sys.modules.get("mmengine.logging")
    if logging is not None:
        for logger in logging.MMLogger._instance_dict.values():
            for handler in logger.handlers:
                stream = getattr(handler, "stream", None)
                if getattr(stream, "closed", False):
                    handler.stream = sys.stdout  # not setStream: it flushes the closed one

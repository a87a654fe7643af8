import importlib.util
import os

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

import os

import pytest
import torch

# Two cores are shared by pytest-xdist workers: one torch thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("TSM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

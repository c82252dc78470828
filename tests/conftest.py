import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared tolerance table as `parity`

# One intra-op thread: the tests' tiny ops gain nothing from threads, and on a busy CPU (two
# xdist workers on two cores) spinning OpenMP threads make each op many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    from fastdit.kernels import kernel_path

    return f"fastdit kernels: {kernel_path('cpu')} on cpu" + (
        f", {kernel_path('cuda')} on cuda" if torch.cuda.is_available() else ""
    )

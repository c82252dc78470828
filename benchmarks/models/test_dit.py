"""The full forward of DiT: every implementation of fastdit.bench.workloads, checked, then timed."""
import pytest
from harness import ON_GPU

from fastdit.bench.workloads import IMPLEMENTATIONS

# (model, image size in pixels, batch): the paper's /2 models at 256 px and DiT-XL/2 at 512 px on a
# GPU; small models on the CPU.
CASES = ([("DiT-S/2", 256, 32), ("DiT-B/2", 256, 32), ("DiT-L/2", 256, 32), ("DiT-XL/2", 256, 32),
          ("DiT-XL/2", 512, 8)] if ON_GPU else [("DiT-S/2", 64, 2), ("DiT-B/4", 64, 2)])
ROUNDS = 10 if ON_GPU else 5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_case", CASES, indirect=True, ids=lambda case: "{}-{}px-x{}".format(*case))
def test_forward(benchmark_workload, model_case, implementation):
    benchmark_workload(model_case, "forward", implementation, ROUNDS)

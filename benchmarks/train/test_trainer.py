"""One training step (the diffusion loss, backward, AdamW): every implementation of
fastdit.bench.workloads, its loss and gradients checked, then timed."""
import pytest
from harness import ON_GPU

from fastdit.bench.workloads import IMPLEMENTATIONS

# (model, image size in pixels, batch): DiT-XL/2 and DiT-S/2 at 256 px on a GPU; a small model on the CPU.
CASES = [("DiT-XL/2", 256, 32), ("DiT-S/2", 256, 32)] if ON_GPU else [("DiT-S/2", 64, 2)]
ROUNDS = 10 if ON_GPU else 3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_case", CASES, indirect=True, ids=lambda case: "{}-{}px-x{}".format(*case))
def test_training_step(benchmark_workload, model_case, implementation):
    benchmark_workload(model_case, "training-step", implementation, ROUNDS)

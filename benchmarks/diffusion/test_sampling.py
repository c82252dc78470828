"""Sampling: one guided denoising step (fastdit.bench.workloads) and one whole guided run of
``fastdit.sample``, for every implementation, each checked against the fp32 reference, then timed."""
import pytest
from harness import DTYPE, ON_GPU

from fastdit.bench.workloads import CFG_SCALE, IMPLEMENTATIONS, check_parity, dtype_name, implementation_dtype
from fastdit.diffusion.sampling import sample
from fastdit.models.flops import named_shape, workload_flops

# (model, image size in pixels, batch): DiT-XL/2 at 256 px on a GPU; a small model on the CPU.
CASES = [("DiT-XL/2", 256, 16)] if ON_GPU else [("DiT-S/2", 64, 2)]
CASE_IDS = "{}-{}px-x{}".format
ROUNDS = 10 if ON_GPU else 5
RUN_STEPS = 25 if ON_GPU else 4  # DDIM, 25 steps: the release's "ddim25" schedule
RUN_ROUNDS = 3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_case", CASES, indirect=True, ids=lambda case: CASE_IDS(*case))
def test_sampling_step(benchmark_workload, model_case, implementation):
    benchmark_workload(model_case, "sampling-step", implementation, ROUNDS)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_case", CASES, indirect=True, ids=lambda case: CASE_IDS(*case))
def test_sampling_run(measure, skip_unless_available, model_case, implementation):
    skip_unless_available(implementation)  # fastdit-cudagraphs: sample's own CUDA-graph loop
    labels = model_case.inputs.y

    def run(model, cuda_graphs=False):
        latents = sample(model, labels, sampler="ddim", steps=RUN_STEPS, cfg_scale=CFG_SCALE, seed=0,
                         cuda_graphs=cuda_graphs)
        return {"latents": latents}

    expected = model_case.expected("sampling-run", lambda: run(model_case.models.reference))
    model = model_case.models.model(implementation)

    def fn():
        return run(model, cuda_graphs=implementation == "fastdit-cudagraphs")

    dtype = implementation_dtype(implementation, DTYPE)
    # DDIM's update is linear in eps with bounded coefficients: a few steps' errors add up to about
    # one model's (measured on the CPU: 1.5e-2 to 3.5e-2 in bf16 over 10 to 50 steps).
    error = check_parity(fn(), expected, dtype, f"{implementation} sampling run")
    shape = named_shape(model_case.name, model_case.image_size // 8)
    measure(fn, model_case.group(f"sampling-run ddim{RUN_STEPS} cfg{CFG_SCALE:g}"), rounds=RUN_ROUNDS,
            flops=RUN_STEPS * workload_flops(shape, "sampling-step") * len(labels), images=len(labels),
            dtype=dtype_name(dtype), max_error=error, steps=RUN_STEPS)

"""Feature-cached sampling against exact sampling (``fastdit.sample(..., cache=)``): one guided DDIM run of the
fast model per row. The baseline row is ``exact`` (every block at every step, the same fast model): a cache
trades quality for speed against it, not against ``fastdit.reference``. extra_info has the blocks each image
ran, the FLOPs that were computed and the relative max error against the exact run from the same noise."""
import pytest
from harness import DTYPE, ON_GPU

from fastdit.bench.workloads import CFG_SCALE, dtype_name
from fastdit.diffusion.caching import block_evaluations, resolve
from fastdit.diffusion.sampling import sample
from fastdit.models.flops import forward_macs_by_part, named_shape, workload_flops
from fastdit.models.parity import relative_max_error

CASES = [("DiT-XL/2", 256, 16)] if ON_GPU else [("DiT-S/2", 64, 2)]
STEPS = 25 if ON_GPU else 6  # DDIM; on the CPU enough steps for the static caches to skip some
ROUNDS = 3 if ON_GPU else 1
MODES = ("exact", "fora", "taylorseer", "fbcache")
GUIDED_FORWARDS = 2  # a guided step runs the model on the batch and its unconditional copy


def skippable_block_macs(shape):
    """One block's MACs per image that a skipped block saves (its adaLN modulation is computed anyway)."""
    parts = forward_macs_by_part(shape)
    names = ("attention_projections", "attention_scores", "mlp", "cross_attention")
    return sum(parts.get(name, 0) for name in names) / shape.depth


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_case", CASES, indirect=True, ids=lambda case: "{}-{}px-x{}".format(*case))
def test_cached_sampling_run(measure, model_case, mode):
    model, labels = model_case.models.model("fastdit-eager"), model_case.inputs.y
    cache = None if mode == "exact" else mode
    counts = []

    def run():
        return sample(model, labels, sampler="ddim", steps=STEPS, cfg_scale=CFG_SCALE, seed=0, cache=cache)

    exact = model_case.expected("sampling-run exact", lambda: sample(model, labels, sampler="ddim", steps=STEPS,
                                                                     cfg_scale=CFG_SCALE, seed=0))
    hooks = [block.register_forward_hook(lambda *_: counts.append(1)) for block in model.blocks]
    try:
        error = relative_max_error(run(), exact)
    finally:
        for hook in hooks:
            hook.remove()
    config, depth = resolve(cache), len(model.blocks)
    blocks = len(counts)
    full_steps = (blocks - STEPS) // (depth - 1) if mode == "fbcache" else None  # fbcache: 1 block per cached step
    assert blocks == block_evaluations(config, STEPS, depth, full_steps)
    shape = named_shape(model_case.name, model_case.image_size // 8)
    step_flops = workload_flops(shape, "sampling-step")
    block_flops = 2 * GUIDED_FORWARDS * skippable_block_macs(shape)
    flops = (STEPS * step_flops - (STEPS * depth - blocks) * block_flops) * len(labels)
    measure(run, model_case.group(f"sampling-run ddim{STEPS} cfg{CFG_SCALE:g} cache"), rounds=ROUNDS, flops=flops,
            images=len(labels), dtype=dtype_name(DTYPE), max_error=error, steps=STEPS, blocks_per_image=blocks)

"""LayerNorm + adaLN modulation: the reference model's norm + modulate against fastdit's fused op."""
import pytest
from fastdit.kernels.modulate import modulate_layernorm, modulate_layernorm_reference
from harness import ON_GPU, group_name, random_inputs, reference_modulate_layernorm

from fastdit.bench.workloads import IMPLEMENTATIONS

# (batch, tokens, hidden size): DiT-XL/2 at 256 and 512 px and DiT-S/2 at 256 px; a small one on the CPU.
SHAPES = [(32, 256, 1152), (8, 1024, 1152), (32, 256, 384)] if ON_GPU else [(2, 64, 384)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "B{}-T{}-D{}".format(*shape))
def test_modulate_layernorm(benchmark_op, shape, implementation):
    batch, tokens, hidden = shape
    inputs = random_inputs((batch, tokens, hidden), (batch, hidden), (batch, hidden))
    benchmark_op(implementation, reference_modulate_layernorm, modulate_layernorm, inputs,
                 modulate_layernorm_reference(*inputs),
                 group_name("modulate_layernorm", f"B{batch} T{tokens} D{hidden}"),
                 elements_moved=2 * batch * tokens * hidden + 2 * batch * hidden)  # x in, out; shift, scale

"""The gated residual x + gate * y, alone and fused with the next LayerNorm + modulation: the
reference model's ops against fastdit's fused ops."""
import pytest
from fastdit.kernels.gated_residual import (
    gated_residual,
    gated_residual_modulate_layernorm,
    gated_residual_modulate_layernorm_reference,
    gated_residual_reference,
)
from harness import ON_GPU, group_name, random_inputs, reference_modulate_layernorm

from fastdit.bench.workloads import IMPLEMENTATIONS

# (batch, tokens, hidden size): DiT-XL/2 at 256 and 512 px and DiT-S/2 at 256 px; a small one on the CPU.
SHAPES = [(32, 256, 1152), (8, 1024, 1152), (32, 256, 384)] if ON_GPU else [(2, 64, 384)]
SHAPE_IDS = "B{}-T{}-D{}".format


def reference_gated_residual(x, gate, y):
    """The reference DiTBlock's residual update."""
    return x + gate.unsqueeze(1) * y


def reference_gated_residual_modulate_layernorm(x, gate, y, shift, scale):
    residual = reference_gated_residual(x, gate, y)
    return residual, reference_modulate_layernorm(residual, shift, scale)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: SHAPE_IDS(*shape))
def test_gated_residual(benchmark_op, shape, implementation):
    batch, tokens, hidden = shape
    inputs = random_inputs((batch, tokens, hidden), (batch, hidden), (batch, tokens, hidden))
    benchmark_op(implementation, reference_gated_residual, gated_residual, inputs, gated_residual_reference(*inputs),
                 group_name("gated_residual", f"B{batch} T{tokens} D{hidden}"),
                 elements_moved=3 * batch * tokens * hidden + batch * hidden)  # x, y in, out; gate


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: SHAPE_IDS(*shape))
def test_gated_residual_modulate_layernorm(benchmark_op, shape, implementation):
    batch, tokens, hidden = shape
    inputs = random_inputs((batch, tokens, hidden), (batch, hidden), (batch, tokens, hidden), (batch, hidden),
                           (batch, hidden))
    benchmark_op(implementation, reference_gated_residual_modulate_layernorm, gated_residual_modulate_layernorm,
                 inputs, gated_residual_modulate_layernorm_reference(*inputs),
                 group_name("gated_residual_modulate_layernorm", f"B{batch} T{tokens} D{hidden}"),
                 elements_moved=4 * batch * tokens * hidden + 3 * batch * hidden)  # x, y in; residual, normed out

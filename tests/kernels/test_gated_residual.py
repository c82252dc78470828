import pytest
import torch
from parity import DTYPES, KERNEL_TOLERANCE, assert_parity, relative_max_error

from fastdit.kernels import kernel_path
from fastdit.kernels.gated_residual import (
    gated_residual,
    gated_residual_modulate_layernorm,
    gated_residual_reference,
)
from fastdit.kernels.modulate import modulate_layernorm, modulate_layernorm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    kernel_path(DEVICE) == "torch",
    reason="no Triton path on this device (set TRITON_INTERPRET=1): the op would run its own reference",
)

# batch 1, token counts off any block size, DiT hidden sizes, and hidden sizes that are not a power of two
SHAPES = [(1, 1, 384), (2, 7, 72), (3, 33, 1152), (2, 100, 200), (1, 16, 768), (2, 5, 1024)]


def make_inputs(batch, tokens, hidden_size, dtype, strided):
    """x, gate, y, shift, scale; strided: x, y token-sliced views and gate/shift/scale chunks of a (B, 6D)
    adaLN_modulation output, as the model passes them."""
    def hidden_states():
        if strided:
            return torch.randn(batch, 2 * tokens, hidden_size, device=DEVICE).to(dtype)[:, ::2]
        return torch.randn(batch, tokens, hidden_size, device=DEVICE).to(dtype)

    if strided:
        shift, scale, gate, *_ = torch.randn(batch, 6 * hidden_size, device=DEVICE).to(dtype).chunk(6, dim=1)
    else:
        shift, scale, gate = (torch.randn(batch, hidden_size, device=DEVICE).to(dtype) for _ in range(3))
    return hidden_states(), gate, hidden_states(), shift, scale


def expected_residual(x, gate, y):
    return gated_residual_reference(x.float(), gate.float(), y.float())


def expected_normed(stored_residual, shift, scale):
    return modulate_layernorm_reference(stored_residual.float(), shift.float(), scale.float())


@requires_triton
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_matches_reference(shape, dtype, strided):
    x, gate, y, _, _ = make_inputs(*shape, dtype, strided)
    residual = gated_residual(x, gate, y)
    assert residual.dtype == dtype and residual.shape == x.shape and residual.is_contiguous()
    assert_parity(residual, expected_residual(x, gate, y), KERNEL_TOLERANCE[dtype])


@requires_triton
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_matches_reference(shape, dtype, strided):
    x, gate, y, shift, scale = make_inputs(*shape, dtype, strided)
    residual, normed = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
    for out in (residual, normed):
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    fp32_residual = expected_residual(x, gate, y)
    assert_parity(residual, fp32_residual, KERNEL_TOLERANCE[dtype], "residual")
    # normed is defined on the residual as stored in x's dtype (what an unfused eager model normalises)
    assert_parity(normed, expected_normed(fp32_residual.to(dtype), shift, scale), KERNEL_TOLERANCE[dtype], "normed")


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_equals_unfused_sequence(dtype):
    x, gate, y, shift, scale = make_inputs(2, 7, 200, dtype, strided=True)
    residual, normed = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
    unfused_residual = gated_residual(x, gate, y)
    assert torch.equal(residual, unfused_residual)
    assert torch.equal(normed, modulate_layernorm(unfused_residual, shift, scale))


@requires_triton
def test_normed_is_taken_from_the_stored_residual():
    # In fp16 a residual near 100 is stored to 1/32: the LayerNorm of the rounded and of the exact sum differ
    # by more than the fp16 tolerance, so this pins down which one the fused op computes.
    dtype = torch.float16
    x, gate, y, shift, scale = make_inputs(2, 16, 384, dtype, strided=True)
    x = x + 100
    residual, normed = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
    assert_parity(residual, expected_residual(x, gate, y), KERNEL_TOLERANCE[dtype], "residual")
    assert_parity(normed, expected_normed(residual, shift, scale), KERNEL_TOLERANCE[dtype], "normed")
    from_exact_sum = expected_normed(expected_residual(x, gate, y), shift, scale)
    assert relative_max_error(normed, from_exact_sum) > KERNEL_TOLERANCE[dtype]


@requires_triton
def test_large_mean_keeps_fp32_parity():
    x, gate, y, shift, scale = make_inputs(2, 16, 1152, torch.float32, strided=True)
    x = x + 100
    residual, normed = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
    exact_residual = gated_residual_reference(x.double(), gate.double(), y.double())
    exact_normed = modulate_layernorm_reference(exact_residual, shift.double(), scale.double())
    assert_parity(residual, exact_residual, KERNEL_TOLERANCE[torch.float32], "residual")
    assert_parity(normed, exact_normed, KERNEL_TOLERANCE[torch.float32], "normed")


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ungated_residual_fails_tolerance(dtype):
    x, gate, y, shift, scale = make_inputs(2, 7, 384, dtype, strided=True)
    residual, normed = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
    ungated = x.float() + y.float()
    assert relative_max_error(gated_residual(x, gate, y), ungated) > KERNEL_TOLERANCE[dtype]
    assert relative_max_error(residual, ungated) > KERNEL_TOLERANCE[dtype]
    assert relative_max_error(normed, expected_normed(ungated, shift, scale)) > KERNEL_TOLERANCE[dtype]


def _bad_inputs(case):
    x, gate, y, shift, scale = make_inputs(2, 3, 72, torch.float32, strided=False)
    if case == "y shape":
        y = y[:, :2]
    elif case == "x rank 2":
        x = x[0]
    elif case == "x int dtype":
        x = x.to(torch.int64)
    elif case == "gate hidden size":
        gate = gate[:, :64]
    elif case == "gate dtype":
        gate = gate.bfloat16()
    elif case == "y dtype":
        y = y.half()
    elif case == "shift batch":
        shift = shift[:1]
    elif case == "scale dtype":
        scale = scale.half()
    return x, gate, y, shift, scale


RESIDUAL_CASES = [
    ("y shape", ValueError, "y"),
    ("x rank 2", ValueError, "x"),
    ("x int dtype", TypeError, "x"),
    ("gate hidden size", ValueError, "gate"),
    ("gate dtype", TypeError, "gate"),
    ("y dtype", TypeError, "y"),
]


@pytest.mark.parametrize("case, error, name", RESIDUAL_CASES)
def test_gated_residual_bad_inputs_name_the_argument(case, error, name):
    x, gate, y, _, _ = _bad_inputs(case)
    with pytest.raises(error, match=rf"^{name} "):
        gated_residual(x, gate, y)


@pytest.mark.parametrize(
    "case, error, name", RESIDUAL_CASES + [("shift batch", ValueError, "shift"), ("scale dtype", TypeError, "scale")]
)
def test_fused_bad_inputs_name_the_argument(case, error, name):
    with pytest.raises(error, match=rf"^{name} "):
        gated_residual_modulate_layernorm(*_bad_inputs(case))


def test_torch_compile_fullgraph_matches_eager():
    def block_tail(x, attention_out, mlp_out, modulation):
        shift_mlp, scale_mlp, gate_mlp, _, _, gate_msa = modulation.chunk(6, dim=1)
        x, normed = gated_residual_modulate_layernorm(x, gate_msa, attention_out, shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, mlp_out), normed

    x, _, attention_out, _, _ = make_inputs(2, 5, 72, torch.float32, strided=True)
    mlp_out = torch.randn(2, 5, 72, device=DEVICE)
    modulation = torch.randn(2, 6 * 72, device=DEVICE)
    compiled = torch.compile(block_tail, fullgraph=True)
    for actual, eager in zip(compiled(x, attention_out, mlp_out, modulation), block_tail(x, attention_out, mlp_out, modulation)):
        assert torch.equal(actual, eager)


def test_opcheck():
    x, gate, y, shift, scale = make_inputs(2, 3, 72, torch.bfloat16, strided=True)
    torch.library.opcheck(gated_residual, (x, gate, y))
    torch.library.opcheck(gated_residual_modulate_layernorm, (x, gate, y, shift, scale), {"eps": 1e-5})

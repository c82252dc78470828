import pytest
import torch
from parity import (DEVICE, DTYPE_PAIRS, DTYPES, HIDDEN_STATE_SHAPES, KERNEL_TOLERANCE, assert_compiled_matches_eager,
                    assert_fails_with_wrong_kernels, assert_grads_match, assert_parity, assert_quantized_rows,
                    launches_kernels, relative_max_error, requires_triton)

from fastdit.kernels.modulate import (
    modulate_layernorm,
    modulate_layernorm_backward,
    modulate_layernorm_backward_reference,
    modulate_layernorm_fp8,
    modulate_layernorm_reference,
)


GRAD_NAMES = ("x", "shift", "scale")


def make_x(batch, tokens, hidden_size, dtype, layout="contiguous"):
    if layout == "contiguous":
        return torch.randn(batch, tokens, hidden_size, device=DEVICE).to(dtype)
    if layout == "token-slice":
        return torch.randn(batch, 2 * tokens, hidden_size, device=DEVICE).to(dtype)[:, ::2]
    if layout == "batch-slice":
        return torch.randn(2 * batch, tokens, hidden_size, device=DEVICE).to(dtype)[::2]
    if layout == "transposed":  # hidden dim not stride 1: the launcher copies it
        return torch.randn(batch, hidden_size, tokens, device=DEVICE).to(dtype).transpose(1, 2)
    raise AssertionError(layout)


def make_shift_scale(batch, hidden_size, dtype, strided):
    """As chunks of an adaLN_modulation output (B, 6D), the model's layout, or as contiguous tensors."""
    if strided:
        shift, scale, *_ = torch.randn(batch, 6 * hidden_size, device=DEVICE).to(dtype).chunk(6, dim=1)
        return shift, scale
    return torch.randn(batch, hidden_size, device=DEVICE).to(dtype), torch.randn(batch, hidden_size, device=DEVICE).to(dtype)


def expected(x, shift, scale, eps=1e-6):
    return modulate_layernorm_reference(x.float(), shift.float(), scale.float(), eps)


def op_grads(x, shift, scale, grad):
    """Grads of the op wrt x, shift, scale (made leaves in place: views keep their strides)."""
    inputs = [tensor.requires_grad_() for tensor in (x, shift, scale)]
    return torch.autograd.grad(modulate_layernorm(*inputs), inputs, grad)


def expected_grads(x, shift, scale, grad, eps=1e-6):
    """Grads of the fp32 reference, inputs upcast, by torch.autograd."""
    inputs = [tensor.detach().float().requires_grad_() for tensor in (x, shift, scale)]
    return torch.autograd.grad(modulate_layernorm_reference(*inputs, eps), inputs, grad.float())


@requires_triton
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_STATE_SHAPES, ids=str)
def test_matches_reference(shape, dtype, strided):
    batch, tokens, hidden_size = shape
    x = make_x(*shape, dtype, "token-slice" if strided else "contiguous")
    shift, scale = make_shift_scale(batch, hidden_size, dtype, strided)
    out = modulate_layernorm(x, shift, scale)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_parity(out, expected(x, shift, scale), KERNEL_TOLERANCE[dtype])


@requires_triton
@pytest.mark.parametrize("layout", ["batch-slice", "token-slice", "transposed"])
def test_noncontiguous_x(layout):
    x = make_x(2, 9, 200, torch.float32, layout)
    assert not x.is_contiguous()
    shift, scale = make_shift_scale(2, 200, torch.float32, strided=True)
    assert_parity(modulate_layernorm(x, shift, scale), expected(x, shift, scale), KERNEL_TOLERANCE[torch.float32])


@requires_triton
def test_large_mean_keeps_fp32_parity():
    # A residual stream far from zero: E[x^2] - E[x]^2 would lose the variance to cancellation in fp32.
    x = torch.randn(2, 16, 1152, device=DEVICE) + 100
    shift, scale = make_shift_scale(2, 1152, torch.float32, strided=True)
    exact = modulate_layernorm_reference(x.double(), shift.double(), scale.double())
    assert_parity(modulate_layernorm(x, shift, scale), exact, KERNEL_TOLERANCE[torch.float32])

    mean = x.mean(-1, keepdim=True)
    one_pass_variance = (x * x).mean(-1, keepdim=True) - mean * mean
    one_pass = (x - mean) * torch.rsqrt(one_pass_variance + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert relative_max_error(one_pass, exact) > KERNEL_TOLERANCE[torch.float32], "the test cannot tell two moments from one"


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_without_one_fails_tolerance(dtype):
    x = make_x(2, 7, 384, dtype)
    shift, scale = make_shift_scale(2, 384, dtype, strided=True)
    out = modulate_layernorm(x, shift, scale)
    normed = torch.nn.functional.layer_norm(x.float(), (384,), eps=1e-6)
    wrong = normed * scale.float()[:, None] + shift.float()[:, None]
    assert relative_max_error(out, wrong) > KERNEL_TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrong_eps_fails_tolerance(dtype):
    x = 1e-2 * make_x(2, 7, 384, dtype)  # variance 1e-4: eps 1e-3 would dominate it
    shift, scale = make_shift_scale(2, 384, dtype, strided=True)
    out = modulate_layernorm(x, shift, scale)
    assert_parity(out, expected(x, shift, scale), KERNEL_TOLERANCE[dtype])
    assert relative_max_error(out, expected(x, shift, scale, eps=1e-3)) > KERNEL_TOLERANCE[dtype]


@launches_kernels
def test_eps_is_used():
    x = 1e-2 * make_x(1, 3, 72, torch.float32)
    shift, scale = make_shift_scale(1, 72, torch.float32, strided=False)
    assert_parity(modulate_layernorm(x, shift, scale, 1e-3), expected(x, shift, scale, 1e-3), KERNEL_TOLERANCE[torch.float32])


@requires_triton
def test_mixed_dtypes_output_in_shift_dtype():
    # torch.autocast: the residual stream stays fp32 while the adaLN linear outputs bf16
    x = make_x(2, 7, 200, torch.float32, "token-slice")
    shift, scale = make_shift_scale(2, 200, torch.bfloat16, strided=True)
    out = modulate_layernorm(x, shift, scale)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert_parity(out, expected(x, shift, scale), KERNEL_TOLERANCE[torch.bfloat16])


# Gradient tests run on every kernel path: off Triton the backward op computes the same formulas in
# torch, not autograd through the reference, so the comparison is never the reference with itself.
@launches_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_STATE_SHAPES, ids=str)
def test_backward_matches_reference(shape, dtype):
    # The backward op called directly: through autograd the forward kernel would double the run time
    # under the interpreter; the autograd wiring is tested below, for every dtype.
    batch, tokens, hidden_size = shape
    x = make_x(*shape, dtype, "token-slice")
    shift, scale = make_shift_scale(batch, hidden_size, dtype, strided=True)
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    actual = modulate_layernorm_backward(grad, x, scale, 1e-6)
    assert_grads_match(actual, expected_grads(x, shift, scale, grad), (x, shift, scale), GRAD_NAMES)


@launches_kernels
@pytest.mark.parametrize("x_dtype, dtype", DTYPE_PAIRS, ids=str)
def test_autograd_grads_match_reference(x_dtype, dtype):
    x = make_x(2, 33, 384, x_dtype, "token-slice")
    shift, scale = make_shift_scale(2, 384, dtype, strided=True)
    grad = torch.randn(x.shape, device=DEVICE).to(dtype)
    inputs = (x, shift, scale)
    assert_grads_match(op_grads(*inputs, grad), expected_grads(*inputs, grad), inputs, GRAD_NAMES)


@launches_kernels
@pytest.mark.parametrize("layout", ["contiguous", "batch-slice", "transposed"])
def test_grads_other_layouts(layout):
    x = make_x(2, 9, 200, torch.float32, layout)
    shift, scale = make_shift_scale(2, 200, torch.float32, strided=False)
    grad = torch.randn(x.shape, device=DEVICE)
    inputs = (x, shift, scale)
    assert_grads_match(op_grads(*inputs, grad), expected_grads(*inputs, grad), inputs, GRAD_NAMES)


@launches_kernels
def test_grads_of_broadcast_output_grad():
    # out.sum(1) hands the op a grad expanded over tokens (token stride 0)
    x = make_x(2, 7, 72, torch.float32)
    shift, scale = make_shift_scale(2, 72, torch.float32, strided=True)
    weight = torch.randn(2, 72, device=DEVICE)
    inputs = [tensor.requires_grad_() for tensor in (x, shift, scale)]
    actual = torch.autograd.grad((modulate_layernorm(*inputs).sum(1) * weight).sum(), inputs)
    assert_grads_match(actual, expected_grads(x, shift, scale, weight[:, None].expand(x.shape)), inputs, GRAD_NAMES)


def test_torch_backward_formulas_match_autograd():
    # the torch path of the backward op, whatever path this run takes
    x = make_x(2, 7, 200, torch.float32, "token-slice")
    shift, scale = make_shift_scale(2, 200, torch.float32, strided=True)
    grad = torch.randn(x.shape, device=DEVICE)
    actual = modulate_layernorm_backward_reference(grad, x, scale)
    assert_grads_match(actual, expected_grads(x, shift, scale, grad), (x, shift, scale), GRAD_NAMES)


@launches_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_without_xhat_projection_fails_tolerance(dtype):
    x = make_x(2, 7, 384, dtype)
    shift, scale = make_shift_scale(2, 384, dtype, strided=True)
    grad = torch.randn(x.shape, device=DEVICE).to(dtype)
    grad_x = op_grads(x, shift, scale, grad)[0]
    # LayerNorm's backward without the term along xhat: the gradient of a mean-only normalisation
    rstd = torch.rsqrt(x.detach().float().var(-1, correction=0, keepdim=True) + 1e-6)
    grad_xhat = grad.float() * (1 + scale.detach().float()[:, None])
    wrong = rstd * (grad_xhat - grad_xhat.mean(-1, keepdim=True))
    assert_parity(grad_x, expected_grads(x, shift, scale, grad)[0], KERNEL_TOLERANCE[dtype])
    assert relative_max_error(grad_x, wrong) > KERNEL_TOLERANCE[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_kernel_fails_the_parity_tests(dtype):
    """Kernels that write every output 10% off fail the forward's and the backward's parity tests."""
    assert_fails_with_wrong_kernels(test_matches_reference, (2, 7, 72), dtype, strided=True)
    assert_fails_with_wrong_kernels(test_backward_matches_reference, (2, 7, 72), dtype)


def _bad_inputs(case):
    x = make_x(2, 3, 72, torch.float32)
    shift, scale = make_shift_scale(2, 72, torch.float32, strided=False)
    eps = 1e-6
    if case == "shift hidden size":
        shift = shift[:, :64]
    elif case == "shift batch":
        shift = shift[:1]
    elif case == "x rank 2":
        x = x[0]
    elif case == "scale dtype":
        scale = scale.half()
    elif case == "shift dtype":
        x = x.bfloat16()
    elif case == "scale other half":
        shift, scale = shift.bfloat16(), scale.half()
    elif case == "x int dtype":
        x = x.to(torch.int32)
    elif case == "eps zero":
        eps = 0.0
    return x, shift, scale, eps


@pytest.mark.parametrize(
    "case, error, name",
    [
        ("shift hidden size", ValueError, "shift"),
        ("shift batch", ValueError, "shift"),
        ("x rank 2", ValueError, "x"),
        ("scale dtype", TypeError, "scale"),
        ("shift dtype", TypeError, "shift"),
        ("scale other half", TypeError, "scale"),
        ("x int dtype", TypeError, "x"),
        ("eps zero", ValueError, "eps"),
    ],
)
def test_bad_inputs_name_the_argument(case, error, name):
    with pytest.raises(error, match=rf"^modulate_layernorm: {name} must .*, got "):
        modulate_layernorm(*_bad_inputs(case))


@launches_kernels
def test_torch_compile_fullgraph_matches_eager():
    def adaln_norm(x, modulation):
        shift, scale, *_ = modulation.chunk(6, dim=1)
        return modulate_layernorm(x, shift, scale)

    def forward_and_backward(norm):
        x = make_x(2, 5, 72, torch.float32, "token-slice").requires_grad_()
        modulation = torch.randn(2, 6 * 72, device=DEVICE, requires_grad=True)
        out = norm(x, modulation)
        return out, *torch.autograd.grad((out * out).sum(), (x, modulation))

    assert_compiled_matches_eager(forward_and_backward, adaln_norm, ("output", "grad of x", "grad of modulation"))


@launches_kernels
def test_opcheck():
    # requires_grad inputs: opcheck then also checks the autograd registration and the backward's fake
    x = make_x(2, 3, 72, torch.float16, "token-slice").requires_grad_()
    shift, scale = (tensor.requires_grad_() for tensor in make_shift_scale(2, 72, torch.float16, strided=True))
    torch.library.opcheck(modulate_layernorm, (x, shift, scale), {"eps": 1e-5})
    mixed_x = make_x(2, 3, 72, torch.float32, "token-slice").requires_grad_()
    torch.library.opcheck(modulate_layernorm, (mixed_x, shift.bfloat16(), scale.bfloat16()))
    grad = torch.randn(2, 3, 72, device=DEVICE).half()
    torch.library.opcheck(modulate_layernorm_backward, (grad, x.detach(), scale.detach(), 1e-5))


# --- FP8: the normed rows in E4M3 with a scale per row (inference only) ---------------------


# Hidden sizes off the block (72, 200) and a DiT one; batch 1 and token counts off any block.
FP8_SHAPES = [(1, 1, 384), (2, 7, 72), (2, 33, 200)]


@launches_kernels
@pytest.mark.parametrize("x_dtype, dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("shape", FP8_SHAPES, ids=str)
def test_fp8_matches_reference(shape, x_dtype, dtype):
    batch, tokens, hidden_size = shape
    x = make_x(*shape, x_dtype, "token-slice")
    shift, scale = make_shift_scale(batch, hidden_size, dtype, strided=True)
    values, scales = modulate_layernorm_fp8(x, shift, scale)
    assert values.is_contiguous()
    assert_quantized_rows(values, scales, expected(x, shift, scale))


@requires_triton
@pytest.mark.parametrize("layout", ["batch-slice", "transposed"])
def test_fp8_noncontiguous_x(layout):
    x = make_x(2, 9, 200, torch.bfloat16, layout)
    shift, scale = make_shift_scale(2, 200, torch.bfloat16, strided=False)
    assert_quantized_rows(*modulate_layernorm_fp8(x, shift, scale), expected(x, shift, scale))


@requires_triton
def test_fp8_wrong_rows_fail():
    """The check catches a 10% error in the values or in the scales (the test of a deliberately wrong kernel:
    fp8 tensors take no in-place multiply, so the wrong outputs are made here)."""
    x = make_x(2, 7, 72, torch.bfloat16)
    shift, scale = make_shift_scale(2, 72, torch.bfloat16, strided=True)
    values, scales = modulate_layernorm_fp8(x, shift, scale)
    for wrong in ((values, 1.1 * scales), ((1.1 * values.float()).to(values.dtype), scales)):
        with pytest.raises(AssertionError, match="relative max error|past half an E4M3 step"):
            assert_quantized_rows(*wrong, expected(x, shift, scale))


def test_fp8_bad_inputs_name_the_argument():
    for case, error, name in (("shift hidden size", ValueError, "shift"), ("scale dtype", TypeError, "scale"),
                              ("x int dtype", TypeError, "x"), ("eps zero", ValueError, "eps")):
        with pytest.raises(error, match=rf"^modulate_layernorm_fp8: {name} must .*, got "):
            modulate_layernorm_fp8(*_bad_inputs(case))


def test_fp8_is_inference_only():
    x = make_x(1, 3, 72, torch.bfloat16).requires_grad_()
    shift, scale = make_shift_scale(1, 72, torch.bfloat16, strided=False)
    _, scales = modulate_layernorm_fp8(x, shift, scale)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        scales.sum().backward()


@launches_kernels
def test_fp8_opcheck():
    x = make_x(2, 3, 72, torch.bfloat16, "token-slice")
    shift, scale = make_shift_scale(2, 72, torch.bfloat16, strided=True)
    torch.library.opcheck(modulate_layernorm_fp8, (x, shift, scale), {"eps": 1e-5})

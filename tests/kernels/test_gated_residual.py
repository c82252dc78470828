import pytest
import torch
from parity import (DEVICE, DTYPE_PAIRS, DTYPES, HIDDEN_STATE_SHAPES, KERNEL_TOLERANCE, assert_compiled_matches_eager,
                    assert_fails_with_wrong_kernels, assert_grads_match, assert_parity, assert_quantized_rows,
                    launches_kernels, relative_max_error, requires_triton)

from fastdit.kernels.gated_residual import (
    gated_residual,
    gated_residual_backward,
    gated_residual_backward_reference,
    gated_residual_modulate_layernorm,
    gated_residual_modulate_layernorm_backward,
    gated_residual_modulate_layernorm_backward_reference,
    gated_residual_modulate_layernorm_fp8,
    gated_residual_reference,
)
from fastdit.kernels.modulate import modulate_layernorm, modulate_layernorm_reference


# The op's inputs in order; grads of a prefix of them (x, gate, y) take the first names.
GRAD_NAMES = ("x", "gate", "y", "shift", "scale")
# gate=None: the ungated residual ``x + y`` of the paper's adaLN, cross-attention and in-context blocks. The
# tests that hold for both variants take ``gated``.
GATED = pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])


def make_inputs(batch, tokens, hidden_size, dtype, strided, x_dtype=None, gated=True):
    """x, gate, y, shift, scale; strided: x, y token-sliced views and gate/shift/scale chunks of a (B, 6D)
    adaLN_modulation output, as the model passes them. x_dtype: x's dtype if not ``dtype`` (autocast).
    gated=False: gate is None."""
    def hidden_states(dtype):
        if strided:
            return torch.randn(batch, 2 * tokens, hidden_size, device=DEVICE).to(dtype)[:, ::2]
        return torch.randn(batch, tokens, hidden_size, device=DEVICE).to(dtype)

    if strided:
        shift, scale, gate, *_ = torch.randn(batch, 6 * hidden_size, device=DEVICE).to(dtype).chunk(6, dim=1)
    else:
        shift, scale, gate = (torch.randn(batch, hidden_size, device=DEVICE).to(dtype) for _ in range(3))
    return hidden_states(x_dtype or dtype), gate if gated else None, hidden_states(dtype), shift, scale


def present(*tensors):
    """The inputs that exist (gate is None without one): those the grads are taken of, in order."""
    return [tensor for tensor in tensors if tensor is not None]


def grad_names(gate):
    return tuple(name for name in GRAD_NAMES if gate is not None or name != "gate")


def with_gate(inputs, gate):
    """``present``'s list back in the op's order, None where the gate is missing."""
    return inputs if gate is not None else [inputs[0], None, *inputs[1:]]


def without_gate_grad(grads, gate):
    """grads in the op's order, less grad_gate without a gate: the op returns an empty one then (a custom op
    cannot return None), which is checked here."""
    if gate is not None:
        return tuple(grads)
    assert grads[1].shape == (0,), f"grad of a missing gate: {tuple(grads[1].shape)}"
    return (grads[0], *grads[2:])


def expected_residual(x, gate, y):
    return gated_residual_reference(x.float(), None if gate is None else gate.float(), y.float())


def expected_normed(stored_residual, shift, scale):
    return modulate_layernorm_reference(stored_residual.float(), shift.float(), scale.float())


def leaves(*tensors):
    """The tensors made leaves that require grad, in place: views keep their strides (a missing gate stays None)."""
    return [tensor if tensor is None else tensor.requires_grad_() for tensor in tensors]


def upcast_leaves(*tensors):
    return [tensor.detach().float().requires_grad_() for tensor in tensors]


def expected_gated_residual_grads(x, gate, y, grad_residual):
    inputs = upcast_leaves(*present(x, gate, y))
    return torch.autograd.grad(gated_residual_reference(*with_gate(inputs, gate)), inputs, grad_residual.float())


def expected_fused_grads(x, gate, y, shift, scale, grad_residual, grad_normed):
    """Grads of the fp32 reference, inputs upcast. normed is taken from the residual rounded to x's dtype,
    as the op defines it; the rounding passes gradients straight through."""
    inputs = upcast_leaves(*present(x, gate, y, shift, scale))
    ops_inputs = with_gate(inputs, gate)
    residual = gated_residual_reference(*ops_inputs[:3])
    stored_residual = residual + (residual.to(x.dtype).float() - residual).detach()
    normed = modulate_layernorm_reference(stored_residual, *ops_inputs[3:])
    return torch.autograd.grad((residual, normed), inputs, (grad_residual.float(), grad_normed.float()))


def fused_grads(x, gate, y, shift, scale, grad_residual, grad_normed):
    inputs = leaves(x, gate, y, shift, scale)
    outputs = gated_residual_modulate_layernorm(*inputs)
    return torch.autograd.grad(outputs, present(*inputs), (grad_residual, grad_normed))


def output_grads(x, shift):
    """Random grads for (residual, normed), in their dtypes."""
    return torch.randn(x.shape, device=DEVICE).to(x.dtype), torch.randn(x.shape, device=DEVICE).to(shift.dtype)


@requires_triton
@GATED
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_STATE_SHAPES, ids=str)
def test_gated_residual_matches_reference(shape, dtype, strided, gated):
    x, gate, y, _, _ = make_inputs(*shape, dtype, strided, gated=gated)
    residual = gated_residual(x, gate, y)
    assert residual.dtype == dtype and residual.shape == x.shape and residual.is_contiguous()
    assert_parity(residual, expected_residual(x, gate, y), KERNEL_TOLERANCE[dtype])


@requires_triton
@GATED
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_STATE_SHAPES, ids=str)
def test_fused_matches_reference(shape, dtype, strided, gated):
    x, gate, y, shift, scale = make_inputs(*shape, dtype, strided, gated=gated)
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


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_dtypes(dtype):
    # torch.autocast: the residual stream stays fp32 while the linears output half precision
    x, gate, y, shift, scale = make_inputs(2, 7, 200, dtype, strided=True, x_dtype=torch.float32)
    residual, normed = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
    assert residual.dtype == torch.float32 and normed.dtype == dtype
    fp32_residual = expected_residual(x, gate, y)
    assert_parity(gated_residual(x, gate, y), fp32_residual, KERNEL_TOLERANCE[torch.float32], "residual")
    assert_parity(residual, fp32_residual, KERNEL_TOLERANCE[torch.float32], "residual")
    assert_parity(normed, expected_normed(fp32_residual, shift, scale), KERNEL_TOLERANCE[dtype], "normed")


# Gradient tests run on every kernel path: off Triton the backward ops compute the same formulas in
# torch, not autograd through the reference, so the comparison is never the reference with itself.
@launches_kernels
@GATED
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_STATE_SHAPES, ids=str)
def test_backward_matches_reference(shape, dtype, gated):
    # The backward ops called directly: through autograd the forward kernels would double the run time
    # under the interpreter; the autograd wiring is tested below, for every dtype.
    x, gate, y, shift, scale = inputs = make_inputs(*shape, dtype, strided=True, gated=gated)
    names = grad_names(gate)
    grad_residual, grad_normed = output_grads(x, shift)
    actual = without_gate_grad((grad_residual, *gated_residual_backward(grad_residual, gate, y)), gate)
    expected = expected_gated_residual_grads(x, gate, y, grad_residual)
    assert_grads_match(actual, expected, present(x, gate, y), names)
    stored_residual = gated_residual_reference(x, gate, y)
    actual = gated_residual_modulate_layernorm_backward(
        grad_residual, grad_normed, stored_residual, gate, y, scale, 1e-6
    )
    expected = expected_fused_grads(*inputs, grad_residual, grad_normed)
    assert_grads_match(without_gate_grad(actual, gate), expected, present(*inputs), names)


@launches_kernels
@GATED
@pytest.mark.parametrize("x_dtype, dtype", DTYPE_PAIRS, ids=str)
def test_autograd_grads_match_reference(x_dtype, dtype, gated):
    inputs = make_inputs(2, 33, 384, dtype, strided=True, x_dtype=x_dtype, gated=gated)
    x, gate, y, shift, _ = inputs
    names = grad_names(gate)
    grads = output_grads(x, shift)
    expected = expected_fused_grads(*inputs, *grads)
    assert_grads_match(fused_grads(*inputs, *grads), expected, present(*inputs), names)
    actual = torch.autograd.grad(gated_residual(x, gate, y), present(x, gate, y), grads[0])
    assert_grads_match(actual, expected_gated_residual_grads(x, gate, y, grads[0]), present(x, gate, y), names)


@launches_kernels
def test_fused_grads_contiguous_inputs_and_normed_unused():
    # Only the residual feeds the loss: autograd hands the backward zeros for the normed output's grad.
    x, gate, y, shift, scale = inputs = leaves(*make_inputs(2, 9, 200, torch.float32, strided=False))
    residual, _ = gated_residual_modulate_layernorm(*inputs)
    weight = torch.randn(x.shape, device=DEVICE)
    actual = torch.autograd.grad((residual * weight).sum(), inputs)
    expected = expected_fused_grads(*inputs, weight, torch.zeros_like(weight))
    assert_grads_match(actual, expected, inputs, GRAD_NAMES)


def test_torch_backward_formulas_match_autograd():
    # the torch path of the backward ops, whatever path this run takes
    x, gate, y, shift, scale = inputs = make_inputs(2, 7, 200, torch.float32, strided=True)
    grad_residual, grad_normed = output_grads(x, shift)
    residual = gated_residual_reference(x, gate, y)
    actual = gated_residual_modulate_layernorm_backward_reference(grad_residual, grad_normed, residual, gate, y, scale)
    assert_grads_match(actual, expected_fused_grads(*inputs, grad_residual, grad_normed), inputs, GRAD_NAMES)
    actual = (grad_residual, *gated_residual_backward_reference(grad_residual, gate, y))
    assert_grads_match(actual, expected_gated_residual_grads(x, gate, y, grad_residual), (x, gate, y), GRAD_NAMES)


@launches_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_ignoring_the_normed_path_fails_tolerance(dtype):
    inputs = make_inputs(2, 7, 384, dtype, strided=True)
    grads = output_grads(inputs[0], inputs[3])
    grad_x, grad_gate = fused_grads(*inputs, *grads)[:2]
    # the plain gated residual's grads: what a backward that drops the normed output's grad would return
    wrong_grad_x = grads[0]
    wrong_grad_gate = expected_gated_residual_grads(*inputs[:3], grads[0])[1]
    assert relative_max_error(grad_x, wrong_grad_x) > KERNEL_TOLERANCE[dtype]
    assert relative_max_error(grad_gate, wrong_grad_gate) > KERNEL_TOLERANCE[dtype]


@requires_triton
@GATED
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_kernel_fails_the_parity_tests(dtype, gated):
    """Kernels that write every output 10% off fail the forward's and the backward's parity tests, for
    the gated residual and the fused op."""
    for test in (test_gated_residual_matches_reference, test_fused_matches_reference):
        assert_fails_with_wrong_kernels(test, (2, 7, 72), dtype, strided=True, gated=gated)
    assert_fails_with_wrong_kernels(test_backward_matches_reference, (2, 7, 72), dtype, gated=gated)


@requires_triton
@pytest.mark.parametrize("x_dtype, dtype", DTYPE_PAIRS, ids=str)
def test_ungated_equals_a_gate_of_ones(x_dtype, dtype):
    # 1 * y is y exactly: the variant without a gate must give what the gated kernels give for ones, bit for bit.
    x, gate, y, shift, scale = make_inputs(2, 7, 200, dtype, strided=True, x_dtype=x_dtype)
    ones = torch.ones_like(gate)
    assert torch.equal(gated_residual(x, None, y), gated_residual(x, ones, y))
    for actual, expected in zip(gated_residual_modulate_layernorm(x, None, y, shift, scale),
                                gated_residual_modulate_layernorm(x, ones, y, shift, scale)):
        assert torch.equal(actual, expected)


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
        x = x.half()
    elif case == "shift batch":
        shift = shift[:1]
    elif case == "scale dtype":
        scale = scale.half()
    elif case == "shift other half":
        x, gate, y, shift, scale = x, gate.bfloat16(), y.bfloat16(), shift.half(), scale.bfloat16()
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
    with pytest.raises(error, match=rf"^gated_residual: {name} must .*, got "):
        gated_residual(x, gate, y)


@pytest.mark.parametrize(
    "case, error, name",
    RESIDUAL_CASES + [
        ("shift batch", ValueError, "shift"),
        ("scale dtype", TypeError, "scale"),
        ("shift other half", TypeError, "shift"),
    ],
)
@pytest.mark.parametrize("op", [gated_residual_modulate_layernorm, gated_residual_modulate_layernorm_fp8],
                         ids=["bf16", "fp8"])
def test_fused_bad_inputs_name_the_argument(op, case, error, name):
    op_name = "gated_residual_modulate_layernorm" + ("_fp8" if op is gated_residual_modulate_layernorm_fp8 else "")
    with pytest.raises(error, match=rf"^{op_name}: {name} must .*, got "):
        op(*_bad_inputs(case))


# FP8 (inference only): the normed rows in E4M3 with a scale per row, the residual as the unquantized op's. Hidden
# sizes off the block (72, 200) and a DiT one; batch 1 and token counts off any block.
@launches_kernels
@GATED
@pytest.mark.parametrize("x_dtype, dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 384), (2, 7, 72), (2, 33, 200)], ids=str)
def test_fp8_matches_reference(shape, x_dtype, dtype, gated):
    x, gate, y, shift, scale = make_inputs(*shape, dtype, strided=True, x_dtype=x_dtype, gated=gated)
    residual, values, scales = gated_residual_modulate_layernorm_fp8(x, gate, y, shift, scale)
    assert residual.dtype == x_dtype and values.is_contiguous()
    assert_parity(residual, expected_residual(x, gate, y), KERNEL_TOLERANCE[x_dtype])
    # normed from the residual as stored, as in the unquantized op
    assert_quantized_rows(values, scales, expected_normed(residual, shift, scale))
    with pytest.raises(AssertionError, match="past half an E4M3 step"):  # a 10% error in the values fails
        assert_quantized_rows((1.1 * values.float()).to(values.dtype), scales, expected_normed(residual, shift, scale))


def test_fp8_is_inference_only():
    x, gate, y, shift, scale = leaves(*make_inputs(1, 3, 72, torch.bfloat16, strided=False))
    residual, _, _ = gated_residual_modulate_layernorm_fp8(x, gate, y, shift, scale)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        residual.sum().backward()


@launches_kernels
def test_torch_compile_fullgraph_matches_eager():
    def block_tail(x, attention_out, mlp_out, modulation):
        shift_mlp, scale_mlp, gate_mlp, _, _, gate_msa = modulation.chunk(6, dim=1)
        x, normed = gated_residual_modulate_layernorm(x, gate_msa, attention_out, shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, mlp_out * normed), normed

    def training_step(tail):
        x, _, attention_out, _, _ = make_inputs(2, 5, 72, torch.float32, strided=True)
        inputs = leaves(x, attention_out, torch.randn(2, 5, 72, device=DEVICE), torch.randn(2, 6 * 72, device=DEVICE))
        residual, normed = tail(*inputs)
        return residual, normed, *torch.autograd.grad((residual * residual).sum() + normed.sum(), inputs)

    names = ("residual", "normed", "grad of x", "grad of attention_out", "grad of mlp_out", "grad of modulation")
    assert_compiled_matches_eager(training_step, block_tail, names)


@launches_kernels
@GATED
def test_opcheck(gated):
    # requires_grad inputs: opcheck then also checks the autograd registration and the backward ops' fakes
    x, gate, y, shift, scale = leaves(*make_inputs(2, 3, 72, torch.bfloat16, strided=True, gated=gated))
    torch.library.opcheck(gated_residual, (x, gate, y))
    torch.library.opcheck(gated_residual_modulate_layernorm, (x, gate, y, shift, scale), {"eps": 1e-5})
    detached = [None if tensor is None else tensor.detach() for tensor in (x, gate, y, shift, scale)]
    torch.library.opcheck(gated_residual_modulate_layernorm_fp8, detached)
    mixed = leaves(*make_inputs(2, 3, 72, torch.float16, strided=True, x_dtype=torch.float32, gated=gated))
    torch.library.opcheck(gated_residual, mixed[:3])
    torch.library.opcheck(gated_residual_modulate_layernorm, mixed)
    x, gate, y, shift, scale = (None if tensor is None else tensor.detach() for tensor in mixed)
    grad_residual, grad_normed = output_grads(x, shift)
    torch.library.opcheck(gated_residual_backward, (grad_residual, gate, y))
    torch.library.opcheck(
        gated_residual_modulate_layernorm_backward, (grad_residual, grad_normed, x, gate, y, scale, 1e-6)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_ungated_backward_on_the_torch_path_returns_no_alias(monkeypatch, dtype):
    """Without a gate grad_y equals grad_residual: the torch path (CPUs without the interpreter) must
    return it as a new tensor, since a custom op's outputs may alias neither its inputs nor each other."""
    from fastdit.kernels import runtime

    monkeypatch.setattr(runtime, "kernel_path", lambda device=None: "torch")
    x, y = (torch.randn(2, 5, 24, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    shift, scale = (torch.randn(2, 24, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    residual, normed = gated_residual_modulate_layernorm(x, None, y, shift, scale)
    (residual.float().sum() + normed.float().square().sum()).backward()
    assert x.grad is not None and y.grad is not None and torch.equal(x.grad, y.grad)
    x.grad = y.grad = None
    gated_residual(x, None, y).float().sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y)) and torch.equal(x.grad, y.grad)

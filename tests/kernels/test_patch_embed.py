import pytest
import torch
from parity import (DEVICE, DTYPES, KERNEL_TOLERANCE, assert_compiled_matches_eager, assert_fails_with_wrong_kernels,
                    assert_parity, launches_kernels, relative_max_error, requires_cuda, requires_triton)

from fastdit.kernels.patch_embed import (patch_embed, patch_embed_backward, patch_embed_backward_reference,
                                         patch_embed_reference)


# (B, C, H, W, p, D). K = C*p*p runs 4..256: below tl.dot's 16 (padded), a partial K block
# (12, 48) and several K blocks (64, 256); token counts 1, 9, 15 (non-square image), 16.
CONFIGS = [
    (1, 4, 8, 8, 2, 384),
    (2, 4, 16, 16, 4, 72),
    (2, 1, 8, 8, 2, 96),
    (1, 3, 12, 12, 4, 200),
    (2, 4, 16, 16, 8, 1152),
    (3, 4, 6, 10, 2, 64),
    (1, 3, 4, 6, 2, 768),
    (1, 4, 8, 8, 8, 1024),
]


def _inputs(batch, channels, height, width, patch, hidden_size, dtype, output_dtype=None):
    """x and weight in dtype; bias and pos_embed in output_dtype (dtype unless given), as
    under autocast, where the parameters stay fp32."""
    tokens = (height // patch) * (width // patch)
    x = torch.randn(batch, channels, height, width, device=DEVICE)
    weight = torch.randn(hidden_size, channels, patch, patch, device=DEVICE) / (channels * patch * patch) ** 0.5
    bias = torch.randn(hidden_size, device=DEVICE)
    pos_embed = torch.randn(1, tokens, hidden_size, device=DEVICE)
    output_dtype = output_dtype or dtype
    return [x.to(dtype), weight.to(dtype), bias.to(output_dtype), pos_embed.to(output_dtype)]


def _expected(x, weight, bias, pos_embed):
    return patch_embed_reference(x.float(), weight.float(), bias.float(), pos_embed.float())


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "B{}C{}H{}W{}p{}D{}".format(*c))
def test_matches_reference(config, dtype):
    x, weight, bias, pos_embed = _inputs(*config, dtype)
    out = patch_embed(x, weight, bias, pos_embed)
    assert out.dtype == dtype and out.is_contiguous()
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "strided_slice", "transposed_hw"])
def test_non_contiguous_x(layout, dtype):
    x, weight, bias, pos_embed = _inputs(2, 4, 8, 12, 2, 72, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided_slice":
        x = torch.cat([x, x], dim=-1)[..., 1::2]  # W stride 2, storage offset 1
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    out = patch_embed(x, weight, bias, pos_embed)
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_parameters(dtype):
    x, weight, bias, pos_embed = _inputs(2, 3, 8, 8, 4, 200, dtype)
    weight = weight.transpose(0, 3).contiguous().transpose(0, 3)  # same values, D no longer outermost
    bias = torch.stack([bias, torch.zeros_like(bias)], dim=1)[:, 0]
    pos_embed = pos_embed[0].t().contiguous().t()  # (T, D) with D strided
    assert not (weight.is_contiguous() or bias.is_contiguous() or pos_embed.is_contiguous())
    out = patch_embed(x, weight, bias, pos_embed)
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


@requires_triton
def test_pos_embed_2d_equals_3d():
    x, weight, bias, pos_embed = _inputs(2, 4, 8, 8, 2, 96, torch.float32)
    assert pos_embed.dim() == 3
    torch.testing.assert_close(patch_embed(x, weight, bias, pos_embed[0]),
                               patch_embed(x, weight, bias, pos_embed), rtol=0, atol=0)


def test_empty_batch():
    x, weight, bias, pos_embed = _inputs(0, 4, 8, 8, 2, 64, torch.float32)
    assert patch_embed(x, weight, bias, pos_embed).shape == (0, 16, 64)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", ["pixels_transposed_in_patch", "patches_transposed"])
def test_wrong_variant_fails(wrong, dtype):
    """The tolerance catches a kernel that reads patches in the wrong order."""
    batch, channels, height, width, patch, hidden_size = 2, 4, 8, 8, 2, 96
    x, weight, bias, pos_embed = _inputs(batch, channels, height, width, patch, hidden_size, dtype)
    out = patch_embed(x, weight, bias, pos_embed)
    if wrong == "pixels_transposed_in_patch":  # column k = c*p*p + j*p + i
        wrong_out = _expected(x, weight.transpose(2, 3), bias, pos_embed)
    else:  # token = wp*(H/p) + hp, with pos_embed still added in the right order
        grid = (batch, height // patch, width // patch, hidden_size)
        convolved = _expected(x, weight, bias, torch.zeros_like(pos_embed)).view(grid)
        wrong_out = convolved.transpose(1, 2).reshape(out.shape) + pos_embed.float()
    assert relative_max_error(out, wrong_out) > KERNEL_TOLERANCE[dtype]
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_kernel_fails_the_parity_tests(dtype):
    """Kernels that write every output 10% off fail the forward's and the gradients' parity tests."""
    assert_fails_with_wrong_kernels(test_matches_reference, CONFIGS[2], dtype)
    assert_fails_with_wrong_kernels(_assert_gradients_match, _inputs(*CONFIGS[2], dtype))


def _gradients(fn, inputs, grad_out, requires_grad=(True, True, True, True)):
    leaves = [t.detach().requires_grad_(needed) for t, needed in zip(inputs, requires_grad)]
    fn(*leaves).backward(grad_out)
    return [t.grad for t in leaves]


def _expected_gradients(inputs, grad_out):
    """Autograd through patch_embed_reference in fp32 on the same inputs."""
    return _gradients(patch_embed_reference, [t.float() for t in inputs], grad_out.float())


def _grad_out(inputs):
    x, weight, _, pos_embed = inputs
    tokens, hidden_size = pos_embed.shape[-2:]
    return torch.randn(x.shape[0], tokens, hidden_size, device=x.device).to(pos_embed.dtype)


def _assert_gradients_match(inputs, grad_out=None):
    grad_out = _grad_out(inputs) if grad_out is None else grad_out
    actual = _gradients(patch_embed, inputs, grad_out)
    for name, grad, expected, t in zip(("x", "weight", "bias", "pos_embed"), actual,
                                       _expected_gradients(inputs, grad_out), inputs):
        assert grad.dtype == t.dtype and grad.shape == t.shape
        assert_parity(grad, expected, KERNEL_TOLERANCE[t.dtype], f"grad_{name}")


@requires_triton
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "B{}C{}H{}W{}p{}D{}".format(*c))
def test_gradients_match_reference(config):
    _assert_gradients_match(_inputs(*config, torch.float32))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[5]], ids=lambda c: "B{}C{}H{}W{}p{}D{}".format(*c))
def test_gradients_in_half_precision(config, dtype):
    _assert_gradients_match(_inputs(*config, dtype))


@requires_triton
@pytest.mark.parametrize("layout", ["channels_last", "strided_slice", "transposed_hw", "parameters"])
def test_gradients_of_non_contiguous_inputs(layout):
    x, weight, bias, pos_embed = _inputs(2, 4, 8, 12, 2, 72, torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided_slice":
        x = torch.cat([x, x], dim=-1)[..., 1::2]
    elif layout == "transposed_hw":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        weight = weight.transpose(0, 3).contiguous().transpose(0, 3)
        pos_embed = pos_embed[0].t().contiguous().t()
    grad_out = torch.randn(2, 24, 72, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # read through .contiguous()
    _assert_gradients_match([x, weight, bias, pos_embed], grad_out)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_dtypes(dtype):
    """x and weight in half precision, bias and pos_embed fp32: the output is fp32 and exact up
    to fp32 accumulation (the dot's products are exact), grad_out is rounded to the dots' dtype."""
    inputs = _inputs(2, 4, 16, 16, 2, 72, dtype, output_dtype=torch.float32)
    out = patch_embed(*inputs)
    assert out.dtype == torch.float32
    assert_parity(out, _expected(*inputs), KERNEL_TOLERANCE[torch.float32])
    _assert_gradients_match(inputs)


@requires_triton
def test_frozen_input_and_pos_embed():
    # DiT's case: neither the latents nor the fixed sin-cos pos_embed take a gradient.
    inputs = _inputs(3, 4, 6, 10, 2, 64, torch.float32)
    grad_out = _grad_out(inputs)
    grads = _gradients(patch_embed, inputs, grad_out, requires_grad=(False, True, True, False))
    expected = _expected_gradients(inputs, grad_out)
    assert grads[0] is None and grads[3] is None
    for grad, expected_grad in zip(grads[1:3], expected[1:3]):
        assert_parity(grad, expected_grad, KERNEL_TOLERANCE[torch.float32])


@requires_cuda
@launches_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dit_xl_gradients_on_gpu(dtype):
    inputs = _inputs(16, 4, 32, 32, 2, 1152, dtype, output_dtype=torch.float32)
    grad_out = _grad_out(inputs)
    _assert_gradients_match(inputs, grad_out)
    first, second = (_gradients(patch_embed, inputs, grad_out) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "the chunked reduction is not deterministic"


def test_backward_reference_matches_autograd():
    inputs = _inputs(2, 3, 8, 12, 4, 40, torch.float32)
    grad_out = _grad_out(inputs)
    for grad, expected in zip(patch_embed_backward_reference(grad_out, *inputs), _expected_gradients(inputs, grad_out)):
        torch.testing.assert_close(grad, expected)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrong_backward_fails_tolerance(dtype):
    """The tolerance catches a backward that scatters or gathers pixels transposed within a patch."""
    inputs = _inputs(2, 4, 8, 8, 2, 96, dtype)
    grad_out = _grad_out(inputs)
    grad_x, grad_weight, _, _ = _gradients(patch_embed, inputs, grad_out)

    def transposed_patches(x, weight, bias, pos_embed):
        return patch_embed_reference(x, weight.transpose(2, 3), bias, pos_embed)

    wrong_x, wrong_weight, _, _ = _gradients(transposed_patches, [t.float() for t in inputs], grad_out.float())
    assert relative_max_error(grad_x, wrong_x) > KERNEL_TOLERANCE[dtype]
    assert relative_max_error(grad_weight, wrong_weight) > KERNEL_TOLERANCE[dtype]


def _break(arguments, what):
    x, weight, bias, pos_embed = arguments
    if what == "x_rank":
        return x[0], weight, bias, pos_embed
    if what == "x_not_divisible":
        return x[..., :7], weight, bias, pos_embed
    if what == "weight_channels":
        return x, weight[:, :3], bias, pos_embed
    if what == "weight_not_square":
        return x, weight[..., :1], bias, pos_embed
    if what == "bias_shape":
        return x, weight, bias[:-1], pos_embed
    if what == "pos_embed_tokens":
        return x, weight, bias, pos_embed[:, :-1]
    if what == "pos_embed_hidden":
        return x, weight, bias, pos_embed[..., :-1]
    if what == "pos_embed_dtype":
        return x, weight, bias, pos_embed.half()
    if what == "weight_dtype":
        return x, weight.bfloat16(), bias, pos_embed
    if what == "x_dtype":
        return tuple(t.double() for t in arguments)
    if what == "bias_dtype":
        return x, weight, bias.double(), pos_embed.double()
    raise AssertionError(what)


@pytest.mark.parametrize("what, error, name, must", [
    ("x_rank", ValueError, "x", r"be 4-D"),
    ("x_not_divisible", ValueError, "x", r"have H and W divisible by the patch size p=2"),
    ("weight_channels", ValueError, "weight", r"have x's C=4 input channels"),
    ("weight_not_square", ValueError, "weight", r"be \(D, C, p, p\) with a square kernel"),
    ("bias_shape", ValueError, "bias", r"have shape \(64,\)"),
    ("pos_embed_tokens", ValueError, "pos_embed", r"have shape \(1, 16, 64\)"),
    ("pos_embed_hidden", ValueError, "pos_embed", r"have shape \(1, 16, 64\)"),
    ("pos_embed_dtype", TypeError, "pos_embed", r"have bias's dtype"),
    ("weight_dtype", TypeError, "weight", r"have x's dtype"),
    ("x_dtype", TypeError, "x", r"be float32, float16 or bfloat16"),
    ("bias_dtype", TypeError, "bias", r"be float32, float16 or bfloat16"),
])
def test_bad_inputs_name_the_argument(what, error, name, must):
    arguments = _break(_inputs(2, 4, 8, 8, 2, 64, torch.float32), what)
    with pytest.raises(error, match=rf"^patch_embed: {name} must {must}.*, got "):
        patch_embed(*arguments)


def test_backward_bad_grad_out_names_it():
    inputs = _inputs(2, 4, 8, 8, 2, 64, torch.float32)
    with pytest.raises(ValueError, match=r"^patch_embed_backward: grad_out must .*, got "):
        patch_embed_backward(_grad_out(inputs).half(), *inputs, [True] * 4)


@requires_triton
def test_torch_compile_fullgraph_forward_and_backward_match_eager():
    x, weight, bias, pos_embed = _inputs(2, 4, 8, 12, 2, 72, torch.float32)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    grad_out = torch.randn(2, 24, 72, device=DEVICE)

    def embed(x, weight, bias, pos_embed):
        return patch_embed(x, weight, bias, pos_embed)

    def forward_and_backward(fn):
        out = fn(x, weight, bias, pos_embed)
        return out, *torch.autograd.grad(out, leaves, grad_out)

    names = ("output", "grad of x", "grad of weight", "grad of bias")
    assert_compiled_matches_eager(forward_and_backward, embed, names)


@requires_triton
def test_opcheck():
    inputs = [t.requires_grad_() for t in _inputs(2, 4, 8, 8, 2, 72, torch.bfloat16, output_dtype=torch.float32)]
    torch.library.opcheck(patch_embed, inputs)
    grad_out = _grad_out(inputs)
    torch.library.opcheck(patch_embed_backward, (grad_out, *(t.detach() for t in inputs), [True, True, True, False]))

import pytest
import torch
from parity import DTYPES, KERNEL_TOLERANCE, assert_parity, relative_max_error

from fastdit.kernels import kernel_path
from fastdit.kernels.modulate import modulate_layernorm, modulate_layernorm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    kernel_path(DEVICE) == "torch",
    reason="no Triton path on this device (set TRITON_INTERPRET=1): the op would run its own reference",
)

# batch 1, token counts off any block size, DiT hidden sizes, and hidden sizes that are not a power of two
SHAPES = [(1, 1, 384), (2, 7, 72), (3, 33, 1152), (2, 100, 200), (1, 16, 768), (2, 5, 1024)]


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


@requires_triton
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
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


def test_eps_is_used():
    x = 1e-2 * make_x(1, 3, 72, torch.float32)
    shift, scale = make_shift_scale(1, 72, torch.float32, strided=False)
    assert_parity(modulate_layernorm(x, shift, scale, 1e-3), expected(x, shift, scale, 1e-3), KERNEL_TOLERANCE[torch.float32])


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
        ("x int dtype", TypeError, "x"),
        ("eps zero", ValueError, "eps"),
    ],
)
def test_bad_inputs_name_the_argument(case, error, name):
    with pytest.raises(error, match=rf"^{name} "):
        modulate_layernorm(*_bad_inputs(case))


def test_torch_compile_fullgraph_matches_eager():
    def adaln_norm(x, modulation):
        shift, scale, *_ = modulation.chunk(6, dim=1)
        return modulate_layernorm(x, shift, scale)

    x = make_x(2, 5, 72, torch.float32, "token-slice")
    modulation = torch.randn(2, 6 * 72, device=DEVICE)
    compiled = torch.compile(adaln_norm, fullgraph=True)
    assert torch.equal(compiled(x, modulation), adaln_norm(x, modulation))


def test_opcheck():
    x = make_x(2, 3, 72, torch.float16, "token-slice")
    shift, scale = make_shift_scale(2, 72, torch.float16, strided=True)
    torch.library.opcheck(modulate_layernorm, (x, shift, scale), {"eps": 1e-5})

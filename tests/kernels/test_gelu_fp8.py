"""fastdit.kernels.gelu_fp8: GELU (tanh) and per-row E4M3 quantization in one pass, against its torch reference."""
import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE, DTYPES, assert_quantized_rows, launches_kernels, requires_triton

from fastdit.kernels.gelu_fp8 import gelu_fp8


def expected(x):
    return F.gelu(x.float(), approximate="tanh")


# fc1's output: (batch, tokens, 4 * hidden); features off any block (72, 200), 4 * 384; values to +-12, both tails.
@launches_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1536), (2, 7, 72), (2, 33, 200)], ids=str)
def test_matches_reference(shape, dtype):
    x = (4 * torch.randn(shape, device=DEVICE)).to(dtype)
    values, scales = gelu_fp8(x)
    assert values.is_contiguous()
    assert_quantized_rows(values, scales, expected(x))


@requires_triton
def test_strided_rows():
    x = (4 * torch.randn(3, 10, 160, device=DEVICE)).bfloat16()
    for view in (x[:, ::2], x[..., :72], x.transpose(0, 1)):
        assert not view.is_contiguous()
        assert_quantized_rows(*gelu_fp8(view), expected(view))


@requires_triton
def test_wrong_activation_fails():
    """The exact erf GELU, 4.7e-4 from tanh's at most, fails the bounds: rows of values near x = -2.5, where the
    two differ most relative to the row's max (measured: the rows' scales then differ by 2.6%)."""
    x = torch.full((4, 64), -2.5, device=DEVICE) + 0.01 * torch.randn(4, 64, device=DEVICE)
    values, scales = gelu_fp8(x)
    assert_quantized_rows(values, scales, expected(x))
    with pytest.raises(AssertionError, match="scales: relative max error|past half an E4M3 step"):
        assert_quantized_rows(values, scales, F.gelu(x))


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match=r"^gelu_fp8: x must be float32, float16 or bfloat16, got torch.int32$"):
        gelu_fp8(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^gelu_fp8: x must have a last dimension \(features\) of size >= 1, got "):
        gelu_fp8(torch.ones(2, 0))


def test_is_inference_only():
    x = torch.randn(2, 8, requires_grad=True)
    _, scales = gelu_fp8(x)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        scales.sum().backward()


@launches_kernels
def test_opcheck_and_compile():
    x = torch.randn(2, 5, 72, device=DEVICE).bfloat16()
    torch.library.opcheck(gelu_fp8, (x,))
    compiled = torch.compile(gelu_fp8, fullgraph=True)
    for actual, eager in zip(compiled(x), gelu_fp8(x)):
        assert torch.equal(actual.view(torch.uint8) if actual.dtype == torch.float8_e4m3fn else actual,
                           eager.view(torch.uint8) if eager.dtype == torch.float8_e4m3fn else eager)

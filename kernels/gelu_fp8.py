"""GELU (tanh approximation) of each row and its per-row E4M3 quantization, in one pass: fc2's input
in an FP8 model.

There fc1 is a ``torch._scaled_mm``, which has no GELU epilogue: it writes its (tokens, 4D) output
in bf16. This pass reads that once and writes fc2's E4M3 input (half the bytes) and one fp32 scale
per row; unfused, the GELU and the quantization would be two passes, with a bf16 tensor between.

A program holds one row in registers (``rows.py``'s ``store_quantized_row`` then quantizes it as
``quantize_rows`` does). Inference only: the op has no autograd formula.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tuning
from .launch import ROW_FP_FUSION, check_supported_dtype, input_error
from .rows import FP8, quantize_rows, row_candidates, row_tuning_key, store_quantized_row, unit_stride_rows
from .runtime import device_guard, use_triton

_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)


@triton.jit
def gelu_tanh(x):
    """``0.5 x (1 + tanh(u))``, u = sqrt(2/pi) (x + 0.044715 x^3), written ``x * sigmoid(2u)`` (the same
    function: Triton has no portable tanh). The exponent is capped at 80 (e^80 ~ 6e34, finite in fp32) so
    that large negative x gives a value ~1e-35 |x| below any row's E4M3 resolution, not an overflow."""
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))


@triton.jit
def _gelu_fp8_kernel(x_ptr, values_ptr, scales_ptr, D, x_stride_row, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * D cannot overflow
    columns = tl.arange(0, BLOCK_D)
    mask = columns < D
    x = tl.load(x_ptr + row * x_stride_row + columns, mask=mask, other=0.0)
    # Masked lanes are zero, and so is their GELU: the row's max is the real columns'.
    store_quantized_row(values_ptr, scales_ptr, row, D, columns, mask, gelu_tanh(x.to(tl.float32)))


def _gelu_fp8_triton(x):
    features = x.shape[-1]
    rows = unit_stride_rows(x).reshape(-1, features)
    values = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if values.numel() == 0:
        return values, scales

    def launch(config):
        return _gelu_fp8_kernel[(rows.shape[0],)](
            rows, values, scales, features, rows.stride(0), **config, enable_fp_fusion=ROW_FP_FUSION)

    with device_guard(x):
        tuning.choose("gelu_fp8", row_tuning_key(rows, values), row_candidates(features, x.device), launch,
                      x.device)
    return values, scales


def gelu_fp8_reference(x):
    """The GELU in fp32, quantized per row."""
    return quantize_rows(F.gelu(x.float(), approximate="tanh"))


@torch.library.custom_op("fastdit::gelu_fp8", mutates_args=())
def gelu_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(GELU_tanh(x))`` for x (..., features), the GELU in fp32: (E4M3 values (..., features),
    fp32 scales (..., 1)).

    Inference only: it has no autograd formula (a backward through it raises torch's error saying so)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise input_error(ValueError, "gelu_fp8", "x", "have a last dimension (features) of size >= 1",
                          f"shape {tuple(x.shape)}")
    check_supported_dtype("gelu_fp8", "x", x)
    if use_triton(x):
        return _gelu_fp8_triton(x)
    return gelu_fp8_reference(x)


@gelu_fp8.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)

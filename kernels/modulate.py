"""adaLN modulation of DiT: ``LayerNorm(x) * (1 + scale) + shift``, fused into one pass, and its backward.

DiT normalises every token without affine parameters (eps 1e-6) and then modulates it with
per-sample ``shift``/``scale`` vectors (B, D) broadcast over the T tokens. In the model those
vectors are chunks of ``adaLN_modulation(c)`` (B, 6D), so they arrive as strided views: the
kernels take their batch stride instead of copying them.

Under ``torch.autocast`` the residual stream ``x`` stays fp32 while shift/scale come out of a
bf16/fp16 linear: the output is then in shift's dtype (it feeds a GEMM that would cast it anyway).

``modulate_layernorm_fp8`` writes the same rows in E4M3 with a scale per row, for an FP8 GEMM (the
first block's qkv in an FP8 model): the kernel's QUANTIZE variant (see ``rows.py``).

The per-row math (``layernorm_modulate`` and its backward), the programs' row and token-block
helpers, the launch configurations and the input checks are in ``rows.py``, shared with the fused
residual op in ``gated_residual.py``.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tuning
from .interpreter import to_storage
from .launch import ROW_FP_FUSION
from .rows import (FP8, TOKENS_PER_PROGRAM, backward_candidates, check_compute_dtype, check_hidden_states, check_modulation,
                   layernorm_modulate, layernorm_modulate_backward, per_sample_partials, program_row,
                   program_token_block, quantize_rows, row_candidates, row_tuning_key, store_partial,
                   store_quantized_row, token_tile, unit_stride_rows)
from .runtime import device_guard, use_triton


@triton.jit
def _modulate_layernorm_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, out_scales_ptr,
    tokens, D,
    x_stride_batch, x_stride_token, shift_stride_batch, scale_stride_batch,
    eps,
    QUANTIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row, batch, token, columns, mask = program_row(tokens, D, BLOCK_D)

    x = tl.load(x_ptr + batch * x_stride_batch + token * x_stride_token + columns, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + batch * shift_stride_batch + columns, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=mask, other=0.0)
    out = layernorm_modulate(x.to(tl.float32), mask, shift.to(tl.float32), scale.to(tl.float32), D, eps)
    if QUANTIZE:
        store_quantized_row(out_ptr, out_scales_ptr, row, D, columns, mask, out)
    else:
        tl.store(out_ptr + row * D + columns, to_storage(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulate_layernorm_backward_kernel(
    grad_ptr, x_ptr, scale_ptr, grad_x_ptr, partial_grad_shift_ptr, partial_grad_scale_ptr,
    tokens, D, token_blocks,
    grad_stride_batch, grad_stride_token, x_stride_batch, x_stride_token, scale_stride_batch,
    eps,
    TOKENS_PER_PROGRAM: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    program, batch, first_token, last_token, columns = program_token_block(
        tokens, token_blocks, TOKENS_PER_PROGRAM, BLOCK_D)

    grad_ptr += batch * grad_stride_batch
    x_ptr += batch * x_stride_batch
    grad_x_ptr += batch * tokens * D
    scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=columns < D, other=0.0).to(tl.float32)
    grad_shift = tl.zeros([TILE_TOKENS, BLOCK_D], dtype=tl.float32)
    grad_scale = tl.zeros([TILE_TOKENS, BLOCK_D], dtype=tl.float32)
    for tile_start in range(first_token, last_token, TILE_TOKENS):
        token, mask = token_tile(tile_start, last_token, columns, D, TILE_TOKENS)
        grad = tl.load(grad_ptr + token * grad_stride_token + columns[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + token * x_stride_token + columns[None, :], mask=mask, other=0.0)
        grad_x, xhat = layernorm_modulate_backward(x.to(tl.float32), mask, grad, scale[None, :], D, eps)
        grad_shift += grad
        grad_scale += grad * xhat
        tl.store(grad_x_ptr + token * D + columns[None, :], to_storage(grad_x, grad_x_ptr.dtype.element_ty), mask=mask)
    store_partial(partial_grad_shift_ptr, program, D, columns, grad_shift)
    store_partial(partial_grad_scale_ptr, program, D, columns, grad_scale)


def _modulate_layernorm_triton(x, shift, scale, eps, quantize=False):
    """Launch the kernel: the normed rows in shift's dtype, or with ``quantize`` (E4M3 rows, fp32 scales)."""
    x, shift, scale = unit_stride_rows(x), unit_stride_rows(shift), unit_stride_rows(scale)
    batch, tokens, hidden_size = x.shape
    out = torch.empty((batch, tokens, hidden_size), dtype=FP8 if quantize else shift.dtype, device=x.device)
    # Unquantized, the kernel never touches the scales: out stands in for them (a valid pointer).
    out_scales = torch.empty((batch, tokens, 1), dtype=torch.float32, device=x.device) if quantize else out
    result = (out, out_scales) if quantize else out
    if out.numel() == 0:
        return result

    def launch(config):
        return _modulate_layernorm_kernel[(batch * tokens,)](
            x, shift, scale, out, out_scales,
            tokens, hidden_size,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
            eps,
            QUANTIZE=quantize, **config, enable_fp_fusion=ROW_FP_FUSION,
        )

    with device_guard(x):
        tuning.choose("modulate_layernorm_fp8" if quantize else "modulate_layernorm", row_tuning_key(x, out),
                      row_candidates(hidden_size, x.device), launch, x.device)
    return result


def _modulate_layernorm_backward_triton(grad, x, scale, eps):
    grad, x, scale = unit_stride_rows(grad), unit_stride_rows(x), unit_stride_rows(scale)
    batch, tokens, hidden_size = x.shape
    grad_x = torch.empty((batch, tokens, hidden_size), dtype=x.dtype, device=x.device)
    partial_grad_shift, partial_grad_scale = per_sample_partials(batch, tokens, hidden_size, 2, x.device)
    token_blocks = partial_grad_shift.shape[1]

    def launch(config):
        return _modulate_layernorm_backward_kernel[(batch * token_blocks,)](
            grad, x, scale, grad_x, partial_grad_shift, partial_grad_scale,
            tokens, hidden_size, token_blocks,
            grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), scale.stride(0),
            eps,
            TOKENS_PER_PROGRAM=TOKENS_PER_PROGRAM, **config, enable_fp_fusion=ROW_FP_FUSION,
        )

    if grad_x.numel() > 0:
        with device_guard(x):
            tuning.choose("modulate_layernorm_backward", row_tuning_key(x, grad),
                          backward_candidates(hidden_size, x.device), launch, x.device)
    return grad_x, partial_grad_shift.sum(1).to(scale.dtype), partial_grad_scale.sum(1).to(scale.dtype)


def modulate_layernorm_reference(x, shift, scale, eps: float = 1e-6):
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(shift.dtype)


def modulate_layernorm_fp8_reference(x, shift, scale, eps: float = 1e-6):
    """The normed rows in fp32 (not rounded to shift's dtype first), quantized per row."""
    return quantize_rows(modulate_layernorm_reference(x, shift.float(), scale.float(), eps))


def layernorm_modulate_grads_fp32(grad, x, scale, eps):
    """fp32 (grad_x, grad_shift, grad_scale) of ``modulate_layernorm_reference``, by the kernels' formulas."""
    grad, x = grad.float(), x.float()
    centered = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    xhat = centered * rstd
    grad_xhat = grad * (1 + scale.float()[:, None])
    mean_grad_xhat = grad_xhat.mean(-1, keepdim=True)
    mean_grad_xhat_xhat = (grad_xhat * xhat).mean(-1, keepdim=True)
    return rstd * (grad_xhat - mean_grad_xhat - xhat * mean_grad_xhat_xhat), grad.sum(1), (grad * xhat).sum(1)


def modulate_layernorm_backward_reference(grad, x, scale, eps: float = 1e-6):
    grad_x, grad_shift, grad_scale = layernorm_modulate_grads_fp32(grad, x, scale, eps)
    return grad_x.to(x.dtype), grad_shift.to(scale.dtype), grad_scale.to(scale.dtype)


@torch.library.custom_op("fastdit::modulate_layernorm", mutates_args=())
def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (no affine), x (B, T, D), shift/scale (B, D).

    shift and scale share one dtype: x's, or a half dtype when x is fp32; the output has shift's dtype."""
    _check_inputs("modulate_layernorm", x, shift, scale, eps)
    if use_triton(x):
        return _modulate_layernorm_triton(x, shift, scale, eps)
    return modulate_layernorm_reference(x, shift, scale, eps)


@modulate_layernorm.register_fake
def _(x, shift, scale, eps=1e-6):
    return x.new_empty(x.shape, dtype=shift.dtype)


def _check_inputs(op, x, shift, scale, eps):
    check_hidden_states(op, "x", x)
    check_modulation(op, shift, scale, x, eps, "shift", shift)
    check_compute_dtype(op, "shift", shift, x)


@torch.library.custom_op("fastdit::modulate_layernorm_fp8", mutates_args=())
def modulate_layernorm_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``modulate_layernorm``'s rows, computed in fp32 and quantized per row in the same pass: (E4M3 values
    (B, T, D), fp32 scales (B, T, 1)), ``values * scales`` approximating the rows (``quantize_rows``).

    Inference only: it has no autograd formula (a backward through it raises torch's error saying so)."""
    _check_inputs("modulate_layernorm_fp8", x, shift, scale, eps)
    if use_triton(x):
        return _modulate_layernorm_triton(x, shift, scale, eps, quantize=True)
    return modulate_layernorm_fp8_reference(x, shift, scale, eps)


@modulate_layernorm_fp8.register_fake
def _(x, shift, scale, eps=1e-6):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("fastdit::modulate_layernorm_backward", mutates_args=())
def modulate_layernorm_backward(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_shift, grad_scale) of ``modulate_layernorm`` for the output grad ``grad``; called by
    autograd with the forward's validated inputs (shift is not needed)."""
    if use_triton(x):
        return _modulate_layernorm_backward_triton(grad, x, scale, eps)
    return modulate_layernorm_backward_reference(grad, x, scale, eps)


@modulate_layernorm_backward.register_fake
def _(grad, x, scale, eps):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    x, _, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps


def _backward(ctx, grad):
    x, scale = ctx.saved_tensors
    grad_x, grad_shift, grad_scale = modulate_layernorm_backward(grad, x, scale, ctx.eps)
    return grad_x, grad_shift, grad_scale, None


modulate_layernorm.register_autograd(_backward, setup_context=_setup_context)

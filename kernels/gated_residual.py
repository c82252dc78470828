"""Gated residual update of DiT, ``x + gate[:, None] * y``, optionally fused with the next adaLN norm.

Each DiT sub-block ends with ``x = x + gate * y`` and the next one starts with
``modulate(LayerNorm(x), shift, scale)``. Fused, the row of x and y is read once and the
new residual stream and its normalised, modulated copy are written together: one pass
instead of three. ``gate``/``shift``/``scale`` are (B, D) chunks of ``adaLN_modulation(c)``,
taken with their batch stride as in ``modulate.py``.
"""
import torch
import triton
import triton.language as tl

from .modulate import (
    _layernorm_modulate,
    check_hidden_states,
    check_modulation,
    check_per_sample,
    modulate_layernorm_reference,
    row_launch_config,
    unit_stride_rows,
)
from .interpreter import to_storage
from .runtime import use_triton


@triton.jit
def _gated_residual_kernel(
    x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, residual_ptr, normed_ptr,
    tokens, D,
    x_stride_batch, x_stride_token, y_stride_batch, y_stride_token,
    gate_stride_batch, shift_stride_batch, scale_stride_batch,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 so that row * D cannot overflow on large batches of long sequences
    row = tl.program_id(0).to(tl.int64)
    batch = row // tokens
    token = row % tokens
    columns = tl.arange(0, BLOCK_D)
    mask = columns < D

    x = tl.load(x_ptr + batch * x_stride_batch + token * x_stride_token + columns, mask=mask, other=0.0)
    y = tl.load(y_ptr + batch * y_stride_batch + token * y_stride_token + columns, mask=mask, other=0.0)
    gate = tl.load(gate_ptr + batch * gate_stride_batch + columns, mask=mask, other=0.0)
    residual = to_storage(x.to(tl.float32) + gate.to(tl.float32) * y.to(tl.float32), residual_ptr.dtype.element_ty)
    tl.store(residual_ptr + row * D + columns, residual, mask=mask)

    if NORMALIZE:
        # Normalise the residual as ROUNDED to its storage dtype, not the fp32 sum: the result then
        # equals the unfused residual -> LayerNorm sequence of an eager model, which reads the
        # stored residual back (in fp16/bf16 the rounding matters when the residual's mean is large).
        shift = tl.load(shift_ptr + batch * shift_stride_batch + columns, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=mask, other=0.0)
        normed = _layernorm_modulate(
            residual.to(tl.float32), mask, shift.to(tl.float32), scale.to(tl.float32), D, eps
        )
        tl.store(normed_ptr + row * D + columns, to_storage(normed, normed_ptr.dtype.element_ty), mask=mask)


def _gated_residual_triton(x, gate, y, shift=None, scale=None, eps=1e-6):
    """Launch the kernel; normalises (and returns ``(residual, normed)``) when shift/scale are given."""
    normalize = shift is not None
    x, gate, y = unit_stride_rows(x), unit_stride_rows(gate), unit_stride_rows(y)
    batch, tokens, hidden_size = x.shape
    residual = torch.empty((batch, tokens, hidden_size), dtype=x.dtype, device=x.device)
    if normalize:
        shift, scale = unit_stride_rows(shift), unit_stride_rows(scale)
        normed = torch.empty_like(residual)
    else:
        # never read when NORMALIZE is off; the kernel only needs valid pointers and strides
        shift, scale, normed = gate, gate, residual
    if residual.numel() > 0:
        block_d, num_warps = row_launch_config(hidden_size)
        _gated_residual_kernel[(batch * tokens,)](
            x, gate, y, shift, scale, residual, normed,
            tokens, hidden_size,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            gate.stride(0), shift.stride(0), scale.stride(0),
            eps,
            NORMALIZE=normalize, BLOCK_D=block_d, num_warps=num_warps,
        )
    return (residual, normed) if normalize else residual


def gated_residual_reference(x, gate, y):
    return (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)


def gated_residual_modulate_layernorm_reference(x, gate, y, shift, scale, eps: float = 1e-6):
    residual = gated_residual_reference(x, gate, y)
    return residual, modulate_layernorm_reference(residual, shift, scale, eps)


def _check_gated_residual_inputs(x, gate, y):
    check_hidden_states("x", x)
    check_hidden_states("y", y, like=x)
    check_per_sample("gate", gate, x)


@torch.library.custom_op("fastdit::gated_residual", mutates_args=())
def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` with x, y (B, T, D) and gate (B, D)."""
    _check_gated_residual_inputs(x, gate, y)
    if use_triton(x):
        return _gated_residual_triton(x, gate, y)
    return gated_residual_reference(x, gate, y)


@gated_residual.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastdit::gated_residual_modulate_layernorm", mutates_args=())
def gated_residual_modulate_layernorm(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual, modulate_layernorm(residual, shift, scale, eps))`` with ``residual = x + gate[:, None] * y``."""
    _check_gated_residual_inputs(x, gate, y)
    check_modulation(shift, scale, x, eps)
    if use_triton(x):
        return _gated_residual_triton(x, gate, y, shift, scale, eps)
    return gated_residual_modulate_layernorm_reference(x, gate, y, shift, scale, eps)


@gated_residual_modulate_layernorm.register_fake
def _(x, gate, y, shift, scale, eps=1e-6):
    return x.new_empty(x.shape), x.new_empty(x.shape)

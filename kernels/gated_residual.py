"""Gated residual update of DiT, ``x + gate[:, None] * y``, optionally fused with the next adaLN norm,
and the backward of both.

Each DiT sub-block ends with ``x = x + gate * y`` and the next one starts with
``modulate(LayerNorm(x), shift, scale)``. Fused, the row of x and y is read once and the
new residual stream and its normalised, modulated copy are written together: one pass
instead of three. ``gate``/``shift``/``scale`` are (B, D) chunks of ``adaLN_modulation(c)``,
taken with their batch stride (see ``rows.py``).

The paper's ungated block designs (adaLN, cross-attention, in-context) add ``x + y``: they pass
``gate=None``, which compiles the kernels without the gate (HAS_GATE off) instead of multiplying
by a tensor of ones.

``gated_residual_modulate_layernorm_fp8`` writes the normed copy in E4M3 with a scale per row, for the
FP8 GEMM it feeds (fc1, or the next block's qkv, in an FP8 model): the kernel's QUANTIZE variant (see
``rows.py``).

Under ``torch.autocast`` the residual stream x stays fp32 while y, gate, shift and scale come out of
bf16/fp16 linears: the residual keeps x's dtype and the normed copy takes shift's.
"""
import torch
import triton
import triton.language as tl

from . import tuning
from .interpreter import to_storage
from .launch import ROW_FP_FUSION
from .modulate import layernorm_modulate_grads_fp32, modulate_layernorm_fp8_reference, modulate_layernorm_reference
from .rows import (FP8, TOKENS_PER_PROGRAM, backward_candidates, check_hidden_states, check_modulation, check_per_sample,
                   layernorm_modulate, layernorm_modulate_backward, per_sample_partials, program_row,
                   program_token_block, row_candidates, row_tuning_key, store_partial, store_quantized_row, token_tile,
                   unit_stride_rows)
from .runtime import device_guard, use_triton


@triton.jit
def _gated_residual_kernel(
    x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, residual_ptr, normed_ptr, normed_scales_ptr,
    tokens, D,
    x_stride_batch, x_stride_token, y_stride_batch, y_stride_token,
    gate_stride_batch, shift_stride_batch, scale_stride_batch,
    eps,
    HAS_GATE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row, batch, token, columns, mask = program_row(tokens, D, BLOCK_D)

    x = tl.load(x_ptr + batch * x_stride_batch + token * x_stride_token + columns, mask=mask, other=0.0)
    update = tl.load(y_ptr + batch * y_stride_batch + token * y_stride_token + columns, mask=mask, other=0.0)
    update = update.to(tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + batch * gate_stride_batch + columns, mask=mask, other=0.0)
        update = gate.to(tl.float32) * update
    residual = to_storage(x.to(tl.float32) + update, residual_ptr.dtype.element_ty)
    tl.store(residual_ptr + row * D + columns, residual, mask=mask)

    if NORMALIZE:
        # Normalise the residual as ROUNDED to its storage dtype, not the fp32 sum: the result then
        # equals the unfused residual -> LayerNorm sequence of an eager model, which reads the
        # stored residual back (in fp16/bf16 the rounding matters when the residual's mean is large).
        shift = tl.load(shift_ptr + batch * shift_stride_batch + columns, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=mask, other=0.0)
        normed = layernorm_modulate(
            residual.to(tl.float32), mask, shift.to(tl.float32), scale.to(tl.float32), D, eps
        )
        if QUANTIZE:
            store_quantized_row(normed_ptr, normed_scales_ptr, row, D, columns, mask, normed)
        else:
            tl.store(normed_ptr + row * D + columns, to_storage(normed, normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_backward_kernel(
    grad_residual_ptr, gate_ptr, y_ptr, grad_y_ptr, partial_grad_gate_ptr,
    grad_normed_ptr, residual_ptr, scale_ptr, grad_x_ptr, partial_grad_shift_ptr, partial_grad_scale_ptr,
    tokens, D, token_blocks,
    grad_residual_stride_batch, grad_residual_stride_token, y_stride_batch, y_stride_token,
    grad_normed_stride_batch, grad_normed_stride_token, residual_stride_batch, residual_stride_token,
    gate_stride_batch, scale_stride_batch,
    eps,
    HAS_GATE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    TOKENS_PER_PROGRAM: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    program, batch, first_token, last_token, columns = program_token_block(
        tokens, token_blocks, TOKENS_PER_PROGRAM, BLOCK_D)

    grad_residual_ptr += batch * grad_residual_stride_batch
    y_ptr += batch * y_stride_batch
    grad_normed_ptr += batch * grad_normed_stride_batch
    residual_ptr += batch * residual_stride_batch
    # grad_x and grad_y are contiguous
    grad_x_ptr += batch * tokens * D
    grad_y_ptr += batch * tokens * D
    if HAS_GATE:
        gate = tl.load(gate_ptr + batch * gate_stride_batch + columns, mask=columns < D, other=0.0).to(tl.float32)
        grad_gate = tl.zeros([TILE_TOKENS, BLOCK_D], dtype=tl.float32)
    if NORMALIZE:
        scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=columns < D, other=0.0).to(tl.float32)
        grad_shift = tl.zeros([TILE_TOKENS, BLOCK_D], dtype=tl.float32)
        grad_scale = tl.zeros([TILE_TOKENS, BLOCK_D], dtype=tl.float32)
    for tile_start in range(first_token, last_token, TILE_TOKENS):
        token, mask = token_tile(tile_start, last_token, columns, D, TILE_TOKENS)
        grad_residual_offsets = token * grad_residual_stride_token + columns[None, :]
        grad = tl.load(grad_residual_ptr + grad_residual_offsets, mask=mask, other=0.0).to(tl.float32)
        out_offsets = token * D + columns[None, :]
        if NORMALIZE:
            # The normed output reaches x, gate and y through the residual, as stored (see the forward).
            grad_normed_offsets = token * grad_normed_stride_token + columns[None, :]
            grad_normed = tl.load(grad_normed_ptr + grad_normed_offsets, mask=mask, other=0.0).to(tl.float32)
            residual_offsets = token * residual_stride_token + columns[None, :]
            residual = tl.load(residual_ptr + residual_offsets, mask=mask, other=0.0).to(tl.float32)
            grad_through_norm, xhat = layernorm_modulate_backward(residual, mask, grad_normed, scale[None, :], D, eps)
            grad += grad_through_norm
            grad_shift += grad_normed
            grad_scale += grad_normed * xhat
            tl.store(grad_x_ptr + out_offsets, to_storage(grad, grad_x_ptr.dtype.element_ty), mask=mask)
        if HAS_GATE:
            y = tl.load(y_ptr + token * y_stride_token + columns[None, :], mask=mask, other=0.0)
            grad_gate += grad * y.to(tl.float32)
            grad_y = grad * gate[None, :]
        else:
            # Ungated, y's grad is the residual's: y itself is never read.
            grad_y = grad
        tl.store(grad_y_ptr + out_offsets, to_storage(grad_y, grad_y_ptr.dtype.element_ty), mask=mask)
    if HAS_GATE:
        store_partial(partial_grad_gate_ptr, program, D, columns, grad_gate)
    if NORMALIZE:
        store_partial(partial_grad_shift_ptr, program, D, columns, grad_shift)
        store_partial(partial_grad_scale_ptr, program, D, columns, grad_scale)


def _gated_residual_triton(x, gate, y, shift=None, scale=None, eps=1e-6, quantize=False):
    """Launch the kernel; normalises (and returns ``(residual, normed)``) when shift/scale are given, and with
    ``quantize`` writes the normed rows in E4M3 (``(residual, values, scales)``)."""
    has_gate, normalize = gate is not None, shift is not None
    x, y = unit_stride_rows(x), unit_stride_rows(y)
    batch, tokens, hidden_size = x.shape
    residual = torch.empty((batch, tokens, hidden_size), dtype=x.dtype, device=x.device)
    # Inputs a variant never reads stand in for each other: the kernel only needs valid pointers and strides.
    gate = unit_stride_rows(gate) if has_gate else y
    if normalize:
        shift, scale = unit_stride_rows(shift), unit_stride_rows(scale)
        normed = torch.empty_like(residual, dtype=FP8 if quantize else shift.dtype)
    else:
        shift, scale, normed = gate, gate, residual
    normed_scales = torch.empty((batch, tokens, 1), dtype=torch.float32, device=x.device) if quantize else normed

    def launch(config):
        return _gated_residual_kernel[(batch * tokens,)](
            x, gate, y, shift, scale, residual, normed, normed_scales,
            tokens, hidden_size,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            gate.stride(0), shift.stride(0), scale.stride(0),
            eps,
            HAS_GATE=has_gate, NORMALIZE=normalize, QUANTIZE=quantize, **config, enable_fp_fusion=ROW_FP_FUSION,
        )

    if residual.numel() > 0:
        with device_guard(x):
            tuning.choose(_tuning_name(has_gate, normalize, "_fp8" if quantize else ""), row_tuning_key(x, normed),
                          row_candidates(hidden_size, x.device), launch, x.device)
    if quantize:
        return residual, normed, normed_scales
    return (residual, normed) if normalize else residual


def _gated_residual_backward_triton(grad_residual, gate, y, grad_normed=None, residual=None, scale=None, eps=1e-6):
    """Launch the backward kernel: ``(grad_gate, grad_y)``, or with grad_normed/residual/scale the fused
    op's ``(grad_x, grad_gate, grad_y, grad_shift, grad_scale)``; grad_gate is None when gate is."""
    has_gate, normalize = gate is not None, grad_normed is not None
    grad_residual, y = unit_stride_rows(grad_residual), unit_stride_rows(y)
    batch, tokens, hidden_size = y.shape
    grad_y = torch.empty((batch, tokens, hidden_size), dtype=y.dtype, device=y.device)
    # Inputs and outputs a variant never touches stand in for each other (valid pointers and strides).
    partials = iter(per_sample_partials(batch, tokens, hidden_size, has_gate + 2 * normalize, y.device))
    partial_grad_gate = next(partials) if has_gate else grad_y
    partial_grad_shift, partial_grad_scale = (next(partials), next(partials)) if normalize else (grad_y, grad_y)
    gate = unit_stride_rows(gate) if has_gate else y
    if normalize:
        grad_normed, residual = unit_stride_rows(grad_normed), unit_stride_rows(residual)
        scale = unit_stride_rows(scale)
        grad_x = torch.empty_like(grad_y, dtype=residual.dtype)
    else:
        grad_normed, residual, scale, grad_x = grad_residual, grad_residual, gate, grad_y
    token_blocks = triton.cdiv(tokens, TOKENS_PER_PROGRAM)

    def launch(config):
        return _gated_residual_backward_kernel[(batch * token_blocks,)](
            grad_residual, gate, y, grad_y, partial_grad_gate,
            grad_normed, residual, scale, grad_x, partial_grad_shift, partial_grad_scale,
            tokens, hidden_size, token_blocks,
            grad_residual.stride(0), grad_residual.stride(1), y.stride(0), y.stride(1),
            grad_normed.stride(0), grad_normed.stride(1), residual.stride(0), residual.stride(1),
            gate.stride(0), scale.stride(0),
            eps,
            HAS_GATE=has_gate, NORMALIZE=normalize, TOKENS_PER_PROGRAM=TOKENS_PER_PROGRAM,
            **config, enable_fp_fusion=ROW_FP_FUSION,
        )

    if grad_y.numel() > 0:
        with device_guard(y):
            tuning.choose(_tuning_name(has_gate, normalize, "_backward"), row_tuning_key(y, grad_residual),
                          backward_candidates(hidden_size, y.device), launch, y.device)
    # gate, shift and scale share y's dtype (checked by the forward op).
    grad_gate = partial_grad_gate.sum(1).to(y.dtype) if has_gate else None
    if normalize:
        grad_shift, grad_scale = (partial.sum(1).to(y.dtype) for partial in (partial_grad_shift, partial_grad_scale))
        return grad_x, grad_gate, grad_y, grad_shift, grad_scale
    return grad_gate, grad_y


def _tuning_name(has_gate: bool, normalize: bool, suffix: str) -> str:
    """The kernel variant's name for tuning.choose: each variant keeps its own launch choice."""
    return ("gated_residual" if has_gate else "residual") + ("_modulate_layernorm" if normalize else "") + suffix


def gated_residual_reference(x, gate, y):
    """``x + gate[:, None] * y`` (``x + y`` when gate is None) in fp32, in x's dtype."""
    update = y.float() if gate is None else gate.float()[:, None] * y.float()
    return (x.float() + update).to(x.dtype)


def gated_residual_modulate_layernorm_reference(x, gate, y, shift, scale, eps: float = 1e-6):
    residual = gated_residual_reference(x, gate, y)
    return residual, modulate_layernorm_reference(residual, shift, scale, eps)


def gated_residual_modulate_layernorm_fp8_reference(x, gate, y, shift, scale, eps: float = 1e-6):
    residual = gated_residual_reference(x, gate, y)
    return residual, *modulate_layernorm_fp8_reference(residual, shift, scale, eps)


def gated_residual_backward_reference(grad_residual, gate, y):
    """(grad_gate, grad_y); grad_gate is None when gate is."""
    grad_residual = grad_residual.float()
    if gate is None:
        # A copy: grad_y must not alias grad_residual, which is this op's input (or, in the fused
        # backward, its other output); a custom op may return no alias.
        return None, grad_residual.to(y.dtype, copy=True)
    return (grad_residual * y.float()).sum(1).to(gate.dtype), (grad_residual * gate.float()[:, None]).to(y.dtype)


def gated_residual_modulate_layernorm_backward_reference(
    grad_residual, grad_normed, residual, gate, y, scale, eps: float = 1e-6
):
    grad_through_norm, grad_shift, grad_scale = layernorm_modulate_grads_fp32(grad_normed, residual, scale, eps)
    grad_residual = grad_residual.float() + grad_through_norm
    grad_gate, grad_y = gated_residual_backward_reference(grad_residual, gate, y)
    return grad_residual.to(residual.dtype), grad_gate, grad_y, grad_shift.to(scale.dtype), grad_scale.to(scale.dtype)


def _check_gated_residual_inputs(op, x, gate, y):
    check_hidden_states(op, "x", x)
    check_hidden_states(op, "y", y, like=x)
    if gate is not None:
        check_per_sample(op, "gate", gate, x, "y", y)


@torch.library.custom_op("fastdit::gated_residual", mutates_args=())
def gated_residual(x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` with x, y (B, T, D) and gate (B, D), in x's dtype; ``x + y`` when
    gate is None.

    gate and y share one dtype: x's, or a half dtype when x is fp32."""
    _check_gated_residual_inputs("gated_residual", x, gate, y)
    if use_triton(x):
        return _gated_residual_triton(x, gate, y)
    return gated_residual_reference(x, gate, y)


@gated_residual.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastdit::gated_residual_modulate_layernorm", mutates_args=())
def gated_residual_modulate_layernorm(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual, modulate_layernorm(residual, shift, scale, eps))`` with ``residual = x + gate[:, None] * y``
    (``x + y`` when gate is None).

    y, gate, shift and scale share one dtype: x's, or a half dtype when x is fp32. The residual has
    x's dtype, the normed copy shift's."""
    _check_fused_inputs("gated_residual_modulate_layernorm", x, gate, y, shift, scale, eps)
    if use_triton(x):
        return _gated_residual_triton(x, gate, y, shift, scale, eps)
    return gated_residual_modulate_layernorm_reference(x, gate, y, shift, scale, eps)


@gated_residual_modulate_layernorm.register_fake
def _(x, gate, y, shift, scale, eps=1e-6):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=shift.dtype)


def _check_fused_inputs(op, x, gate, y, shift, scale, eps):
    _check_gated_residual_inputs(op, x, gate, y)
    check_modulation(op, shift, scale, x, eps, "y", y)


@torch.library.custom_op("fastdit::gated_residual_modulate_layernorm_fp8", mutates_args=())
def gated_residual_modulate_layernorm_fp8(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gated_residual_modulate_layernorm`` with the normed rows computed in fp32 and quantized per row in the
    same pass: (residual, E4M3 values (B, T, D), fp32 scales (B, T, 1)); see ``quantize_rows``.

    Inference only: it has no autograd formula (a backward through it raises torch's error saying so)."""
    _check_fused_inputs("gated_residual_modulate_layernorm_fp8", x, gate, y, shift, scale, eps)
    if use_triton(x):
        return _gated_residual_triton(x, gate, y, shift, scale, eps, quantize=True)
    return gated_residual_modulate_layernorm_fp8_reference(x, gate, y, shift, scale, eps)


@gated_residual_modulate_layernorm_fp8.register_fake
def _(x, gate, y, shift, scale, eps=1e-6):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# The backward ops are called by autograd with the forward's validated inputs. A custom op returns
# tensors only: without a gate, its grad comes back empty, shape (0,), and autograd hands back None.
def _grad_gate_or_empty(grad_gate, y):
    return y.new_empty(0) if grad_gate is None else grad_gate


@torch.library.custom_op("fastdit::gated_residual_backward", mutates_args=())
def gated_residual_backward(
    grad_residual: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_y) of ``gated_residual``; the grad wrt x is ``grad_residual`` itself."""
    if use_triton(y):
        grad_gate, grad_y = _gated_residual_backward_triton(grad_residual, gate, y)
    else:
        grad_gate, grad_y = gated_residual_backward_reference(grad_residual, gate, y)
    return _grad_gate_or_empty(grad_gate, y), grad_y


@gated_residual_backward.register_fake
def _(grad_residual, gate, y):
    return y.new_empty(0) if gate is None else gate.new_empty(gate.shape), y.new_empty(y.shape)


@torch.library.custom_op("fastdit::gated_residual_modulate_layernorm_backward", mutates_args=())
def gated_residual_modulate_layernorm_backward(
    grad_residual: torch.Tensor, grad_normed: torch.Tensor, residual: torch.Tensor,
    gate: torch.Tensor | None, y: torch.Tensor, scale: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_gate, grad_y, grad_shift, grad_scale) of ``gated_residual_modulate_layernorm``,
    given its stored ``residual`` output."""
    if use_triton(y):
        grads = _gated_residual_backward_triton(grad_residual, gate, y, grad_normed, residual, scale, eps)
    else:
        grads = gated_residual_modulate_layernorm_backward_reference(
            grad_residual, grad_normed, residual, gate, y, scale, eps
        )
    grad_x, grad_gate, grad_y, grad_shift, grad_scale = grads
    return grad_x, _grad_gate_or_empty(grad_gate, y), grad_y, grad_shift, grad_scale


@gated_residual_modulate_layernorm_backward.register_fake
def _(grad_residual, grad_normed, residual, gate, y, scale, eps):
    grad_gate = y.new_empty(0) if gate is None else gate.new_empty(gate.shape)
    grad_shift, grad_scale = scale.new_empty(scale.shape), scale.new_empty(scale.shape)
    return residual.new_empty(residual.shape), grad_gate, y.new_empty(y.shape), grad_shift, grad_scale


def _gated_residual_setup_context(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_autograd_backward(ctx, grad_residual):
    gate, y = ctx.saved_tensors
    grad_gate, grad_y = gated_residual_backward(grad_residual, gate, y)
    return grad_residual, None if gate is None else grad_gate, grad_y


def _fused_setup_context(ctx, inputs, output):
    _, gate, y, _, scale, eps = inputs
    residual, _ = output
    # The stored residual, not x: LayerNorm's backward needs it and it is alive anyway (the next block's input).
    ctx.save_for_backward(residual, gate, y, scale)
    ctx.eps = eps


def _fused_autograd_backward(ctx, grad_residual, grad_normed):
    residual, gate, y, scale = ctx.saved_tensors
    grad_x, grad_gate, grad_y, grad_shift, grad_scale = gated_residual_modulate_layernorm_backward(
        grad_residual, grad_normed, residual, gate, y, scale, ctx.eps)
    return grad_x, None if gate is None else grad_gate, grad_y, grad_shift, grad_scale, None


gated_residual.register_autograd(_gated_residual_autograd_backward, setup_context=_gated_residual_setup_context)
gated_residual_modulate_layernorm.register_autograd(_fused_autograd_backward, setup_context=_fused_setup_context)

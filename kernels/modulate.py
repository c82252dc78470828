"""adaLN modulation of DiT: ``LayerNorm(x) * (1 + scale) + shift``, fused into one pass, and its backward.

DiT normalises every token without affine parameters (eps 1e-6) and then modulates it with
per-sample ``shift``/``scale`` vectors (B, D) broadcast over the T tokens. In the model those
vectors are chunks of ``adaLN_modulation(c)`` (B, 6D), so they arrive as strided views: the
kernels take their batch stride instead of copying them.

Under ``torch.autocast`` the residual stream ``x`` stays fp32 while shift/scale come out of a
bf16/fp16 linear: the output is then in shift's dtype (it feeds a GEMM that would cast it anyway).

The per-row math lives in ``_layernorm_modulate`` (and its backward) so that the fused residual
op in ``gated_residual.py`` reuses it, together with the backward's token-block helpers and the
launch and validation helpers below.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tuning
from .interpreter import to_storage
from .launch import ROW_FP_FUSION, Config, config, offer, size_bucket
from .runtime import device_guard, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Tokens of one sample per backward program. The per-sample grads (shift, scale, gate) are sums over
# tokens: each program accumulates its block in registers and writes one fp32 partial row, and torch
# sums the (B, token blocks, D) partials, deterministically and with no atomics. 16 keeps that buffer
# a sixteenth of a gradient while DiT training batches (B*T in the thousands) still fill a GPU.
TOKENS_PER_PROGRAM = 16
# Values in one (tokens, hidden) tile of a backward program, spread over 8 warps. Compiled for sm_90,
# 2048 keeps the fused backward (its tiles, three accumulators, 64-bit addresses) at ~180 registers a
# thread with no spills; 4096 spills.
BACKWARD_TILE_VALUES = 2048
BACKWARD_NUM_WARPS = 8


@triton.jit
def _normalize(rows, mask, D, eps):
    """(xhat, rstd) of fp32 rows (one, or a tile) held in registers, normalised along the last axis;
    masked lanes are zero in the rows and in xhat."""
    mean = tl.sum(rows, axis=-1, keep_dims=True) / D
    # Two moments on the resident row, not E[x^2] - E[x]^2: rows with a large mean (the
    # residual stream drifts) would otherwise lose the variance to cancellation in fp32.
    centered = tl.where(mask, rows - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=-1, keep_dims=True) / D + eps)
    return centered * rstd, rstd


@triton.jit
def _layernorm_modulate(row, mask, shift, scale, D, eps):
    """Normalise one fp32 row held in registers (masked lanes zero) and modulate it."""
    xhat, _ = _normalize(row, mask, D, eps)
    return xhat * (1.0 + scale) + shift


@triton.jit
def _layernorm_modulate_backward(rows, mask, grad, scale, D, eps):
    """(grad wrt rows, xhat) of ``_layernorm_modulate`` for the fp32 output grad ``grad`` (masked lanes zero).

    mean and rstd are recomputed from the rows, which the backward reads anyway to form xhat: that
    costs no memory traffic, where saving them would cost the forward a write and an extra output."""
    xhat, rstd = _normalize(rows, mask, D, eps)
    grad_xhat = grad * (1.0 + scale)
    # LayerNorm's Jacobian removes the components of grad_xhat along the all-ones vector and along xhat.
    mean_grad_xhat = tl.sum(grad_xhat, axis=-1, keep_dims=True) / D
    mean_grad_xhat_xhat = tl.sum(grad_xhat * xhat, axis=-1, keep_dims=True) / D
    return rstd * (grad_xhat - mean_grad_xhat - xhat * mean_grad_xhat_xhat), xhat


@triton.jit
def _program_row(tokens, D, BLOCK_D: tl.constexpr):
    """(row, batch, token, columns, mask) of a forward program: the grid is (batch * tokens,), each
    program one token's row of D columns; int64 so that row * D cannot overflow on large batches
    of long sequences."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_D)
    return row, row // tokens, row % tokens, columns, columns < D


@triton.jit
def _program_token_block(tokens, token_blocks, TOKENS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(program, batch, first_token, last_token, columns) of a backward program: the grid is
    (batch * token_blocks,), each program one block of one sample's tokens; int64 offsets."""
    program = tl.program_id(0).to(tl.int64)
    first_token = (program % token_blocks) * TOKENS_PER_PROGRAM
    last_token = tl.minimum(first_token + TOKENS_PER_PROGRAM, tokens)
    return program, program // token_blocks, first_token, last_token, tl.arange(0, BLOCK_D)


@triton.jit
def _token_tile(tile_start, last_token, columns, D, TILE_TOKENS: tl.constexpr):
    """(token, mask) of the (TILE_TOKENS, columns) tile from tile_start: token is a column vector."""
    token = (tile_start + tl.arange(0, TILE_TOKENS))[:, None]
    return token, (token < last_token) & (columns[None, :] < D)


@triton.jit
def _store_partial(partial_ptr, program, D, columns, tile_sums):
    """One program's fp32 partial row of a per-sample grad: the column sums of its tile accumulator."""
    tl.store(partial_ptr + program * D + columns, tl.sum(tile_sums, axis=0), mask=columns < D)


@triton.jit
def _modulate_layernorm_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    tokens, D,
    x_stride_batch, x_stride_token, shift_stride_batch, scale_stride_batch,
    eps,
    BLOCK_D: tl.constexpr,
):
    row, batch, token, columns, mask = _program_row(tokens, D, BLOCK_D)

    x = tl.load(x_ptr + batch * x_stride_batch + token * x_stride_token + columns, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + batch * shift_stride_batch + columns, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=mask, other=0.0)
    out = _layernorm_modulate(x.to(tl.float32), mask, shift.to(tl.float32), scale.to(tl.float32), D, eps)
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
    program, batch, first_token, last_token, columns = _program_token_block(
        tokens, token_blocks, TOKENS_PER_PROGRAM, BLOCK_D)

    grad_ptr += batch * grad_stride_batch
    x_ptr += batch * x_stride_batch
    grad_x_ptr += batch * tokens * D
    scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=columns < D, other=0.0).to(tl.float32)
    grad_shift = tl.zeros([TILE_TOKENS, BLOCK_D], dtype=tl.float32)
    grad_scale = tl.zeros([TILE_TOKENS, BLOCK_D], dtype=tl.float32)
    for tile_start in range(first_token, last_token, TILE_TOKENS):
        token, mask = _token_tile(tile_start, last_token, columns, D, TILE_TOKENS)
        grad = tl.load(grad_ptr + token * grad_stride_token + columns[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + token * x_stride_token + columns[None, :], mask=mask, other=0.0)
        grad_x, xhat = _layernorm_modulate_backward(x.to(tl.float32), mask, grad, scale[None, :], D, eps)
        grad_shift += grad
        grad_scale += grad * xhat
        tl.store(grad_x_ptr + token * D + columns[None, :], to_storage(grad_x, grad_x_ptr.dtype.element_ty), mask=mask)
    _store_partial(partial_grad_shift_ptr, program, D, columns, grad_shift)
    _store_partial(partial_grad_scale_ptr, program, D, columns, grad_scale)


def row_candidates(hidden_size: int, device: torch.device) -> list[Config]:
    """Launch configurations of the kernels that hold one whole row of ``hidden_size`` in registers.

    BLOCK_D is the row padded to a power of two (it must hold the row); the warps vary. Default:
    4 warps up to 1024 columns, past that 8, which keep each thread's share of the row (and of
    the fused kernel's five rows) small enough not to spill. The alternatives halve and double
    it: fewer warps mean fewer idle lanes on the padding, more mean more loads in flight."""
    block_d = triton.next_power_of_2(hidden_size)
    default = 4 if block_d <= 1024 else 8
    warps = [default] + [w for w in (default // 2, default * 2) if block_d >= 32 * w]
    return offer(device, [config(w, BLOCK_D=block_d) for w in warps])


def row_tuning_key(x: torch.Tensor, out: torch.Tensor) -> tuple:
    """The shape class of a row launch: dtypes, hidden size and the bucket of its row count."""
    batch, tokens, hidden_size = x.shape
    return x.dtype, out.dtype, hidden_size, size_bucket(batch * tokens)


def unit_stride_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels step through the hidden dim with stride 1; any other layout is copied once."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def backward_candidates(hidden_size: int, device: torch.device) -> list[Config]:
    """Launch configurations of the backward kernels, which step through (TILE_TOKENS, BLOCK_D)
    tiles of whole rows. Default: BACKWARD_TILE_VALUES over BACKWARD_NUM_WARPS (see there);
    alternatives: the same tile over 4 warps (more programs per SM), and a tile twice as tall
    over 16 warps (half the loop trips for small hidden sizes)."""
    block_d = triton.next_power_of_2(hidden_size)
    tile = max(1, min(TOKENS_PER_PROGRAM, BACKWARD_TILE_VALUES // block_d))
    return offer(device, [
        config(BACKWARD_NUM_WARPS, TILE_TOKENS=tile, BLOCK_D=block_d),
        config(4, TILE_TOKENS=tile, BLOCK_D=block_d),
        config(16, TILE_TOKENS=min(TOKENS_PER_PROGRAM, 2 * tile), BLOCK_D=block_d),
    ])


def per_sample_partials(batch: int, tokens: int, hidden_size: int, count: int, device) -> list[torch.Tensor]:
    """``count`` fp32 (batch, token blocks, hidden_size) buffers, one partial sum per backward program."""
    token_blocks = triton.cdiv(tokens, TOKENS_PER_PROGRAM)
    return [torch.empty((batch, token_blocks, hidden_size), dtype=torch.float32, device=device) for _ in range(count)]


def _modulate_layernorm_triton(x, shift, scale, eps):
    x, shift, scale = unit_stride_rows(x), unit_stride_rows(shift), unit_stride_rows(scale)
    batch, tokens, hidden_size = x.shape
    out = torch.empty((batch, tokens, hidden_size), dtype=shift.dtype, device=x.device)
    if out.numel() == 0:
        return out

    def launch(config):
        return _modulate_layernorm_kernel[(batch * tokens,)](
            x, shift, scale, out,
            tokens, hidden_size,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
            eps,
            **config, enable_fp_fusion=ROW_FP_FUSION,
        )

    with device_guard(x):
        tuning.choose("modulate_layernorm", row_tuning_key(x, out), row_candidates(hidden_size, x.device),
                      launch, x.device)
    return out


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


def check_hidden_states(name: str, tensor: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Raise unless ``tensor`` is (batch, tokens, hidden_size) in a supported dtype (and fits ``like``, x)."""
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be 3-D (batch, tokens, hidden_size); got shape {tuple(tensor.shape)}")
    if like is None:
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16; got {tensor.dtype}")
        return
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(like.shape)}; got {tuple(tensor.shape)}")
    check_compute_dtype(name, tensor, like)
    _check_device(name, tensor, like)


def check_compute_dtype(name: str, tensor: torch.Tensor, x: torch.Tensor) -> None:
    """Raise unless ``tensor`` has x's dtype, or a half dtype while x is fp32 (autocast's residual stream)."""
    if tensor.dtype == x.dtype or (x.dtype == torch.float32 and tensor.dtype in HALF_DTYPES):
        return
    raise TypeError(
        f"{name} must have the dtype of x ({x.dtype}), or float16/bfloat16 when x is float32; got {tensor.dtype}"
    )


def check_per_sample(name: str, vector: torch.Tensor, x: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Raise unless ``vector`` is a (batch, hidden_size) modulation vector for ``x`` in the dtype of ``like``."""
    expected = (x.shape[0], x.shape[2])
    if tuple(vector.shape) != expected:
        raise ValueError(
            f"{name} must have shape (batch, hidden_size) = {expected} to match x; got {tuple(vector.shape)}"
        )
    if vector.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}); got {vector.dtype}")
    _check_device(name, vector, x)


def check_modulation(shift, scale, x, eps: float, like_name: str, like: torch.Tensor) -> None:
    """Raise unless shift/scale modulate ``x`` in the dtype of ``like`` and eps is a usable LayerNorm epsilon."""
    check_per_sample("shift", shift, x, like_name, like)
    check_per_sample("scale", scale, x, like_name, like)
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")


def _check_device(name, tensor, x):
    if tensor.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}); got {tensor.device}")


@torch.library.custom_op("fastdit::modulate_layernorm", mutates_args=())
def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (no affine), x (B, T, D), shift/scale (B, D).

    shift and scale share one dtype: x's, or a half dtype when x is fp32; the output has shift's dtype."""
    check_hidden_states("x", x)
    check_modulation(shift, scale, x, eps, "shift", shift)
    check_compute_dtype("shift", shift, x)
    if use_triton(x):
        return _modulate_layernorm_triton(x, shift, scale, eps)
    return modulate_layernorm_reference(x, shift, scale, eps)


@modulate_layernorm.register_fake
def _(x, shift, scale, eps=1e-6):
    return x.new_empty(x.shape, dtype=shift.dtype)


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

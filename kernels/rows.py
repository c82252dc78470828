"""What the per-row ops (modulate.py, gated_residual.py) share: the @triton.jit helpers of their
row programs, their launch configurations and their input checks.

Their inputs are (batch, tokens, hidden_size) hidden states and (batch, hidden_size) per-sample
vectors (shift, scale, gate), which in the model are chunks of ``adaLN_modulation(c)`` (B, kD):
strided views, which the kernels take with their batch stride instead of copying them.

A forward program holds one token's row in registers. A backward program walks a block of one
sample's tokens in (TILE_TOKENS, BLOCK_D) tiles: the per-sample grads are sums over tokens, so each
program accumulates its block in registers and writes one fp32 partial row, and torch sums the
(B, token blocks, D) partials, deterministically and with no atomics.

FP8 variants of the forward programs (QUANTIZE) write their row in E4M3 with one fp32 scale per row,
for an FP8 GEMM (``torch._scaled_mm``'s row-wise scales): the row is already in registers, so its
max, its scale and its E4M3 values cost no pass of their own (``store_quantized_row``;
``quantize_rows`` is its torch reference). Inference only: E4M3 rows have no gradient.
"""
import math

import torch
import triton
import triton.language as tl

from .interpreter import to_storage
from .launch import (HALF_DTYPES, Config, check_same_device, check_supported_dtype, config, input_error, offer,
                     size_bucket)

# Tokens of one sample per backward program. 16 keeps the partials buffer a sixteenth of a
# gradient while DiT training batches (B*T in the thousands) still fill a GPU.
TOKENS_PER_PROGRAM = 16
# Values in one (tokens, hidden) tile of a backward program, spread over 8 warps. Compiled for sm_90,
# 2048 keeps the fused backward (its tiles, three accumulators, 64-bit addresses) at ~180 registers a
# thread with no spills; 4096 spills.
BACKWARD_TILE_VALUES = 2048
BACKWARD_NUM_WARPS = 8

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# A row of zeros gets this max instead of a division by zero: its values stay zero.
FP8_TINY_AMAX = 1e-12
_FP8_MAX: tl.constexpr = tl.constexpr(FP8_MAX)
_FP8_TINY_AMAX: tl.constexpr = tl.constexpr(FP8_TINY_AMAX)


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values, fp32 scale per row, shape (..., 1)) of ``tensor`` (..., D): ``values * scale``
    approximates it. The scale maps the row's largest magnitude to 448, E4M3's largest value."""
    amax = tensor.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp_min(FP8_TINY_AMAX) / FP8_MAX
    return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def store_quantized_row(values_ptr, scales_ptr, row, D, columns, mask, out):
    """Store one fp32 row (masked lanes zero) as ``quantize_rows`` does: E4M3 values at row * D, its scale at row.

    The divisions round to nearest (div_rn), as torch's do: a compiled ``/`` is an approximate division."""
    amax = tl.max(tl.abs(out), axis=0)
    scale = tl.math.div_rn(tl.maximum(amax, _FP8_TINY_AMAX), _FP8_MAX)
    values = tl.clamp(tl.math.div_rn(out, scale), -_FP8_MAX, _FP8_MAX)
    tl.store(values_ptr + row * D + columns, to_storage(values, tl.float8e4nv), mask=mask)
    tl.store(scales_ptr + row, scale)


@triton.jit
def normalize(rows, mask, D, eps):
    """(xhat, rstd) of fp32 rows (one, or a tile) held in registers, normalised along the last axis;
    masked lanes are zero in the rows and in xhat."""
    mean = tl.sum(rows, axis=-1, keep_dims=True) / D
    # Two moments on the resident row, not E[x^2] - E[x]^2: rows with a large mean (the
    # residual stream drifts) would otherwise lose the variance to cancellation in fp32.
    centered = tl.where(mask, rows - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=-1, keep_dims=True) / D + eps)
    return centered * rstd, rstd


@triton.jit
def layernorm_modulate(row, mask, shift, scale, D, eps):
    """Normalise one fp32 row held in registers (masked lanes zero) and modulate it."""
    xhat, _ = normalize(row, mask, D, eps)
    return xhat * (1.0 + scale) + shift


@triton.jit
def layernorm_modulate_backward(rows, mask, grad, scale, D, eps):
    """(grad wrt rows, xhat) of ``layernorm_modulate`` for the fp32 output grad ``grad`` (masked lanes zero).

    mean and rstd are recomputed from the rows, which the backward reads anyway to form xhat: that
    costs no memory traffic, where saving them would cost the forward a write and an extra output."""
    xhat, rstd = normalize(rows, mask, D, eps)
    grad_xhat = grad * (1.0 + scale)
    # LayerNorm's Jacobian removes the components of grad_xhat along the all-ones vector and along xhat.
    mean_grad_xhat = tl.sum(grad_xhat, axis=-1, keep_dims=True) / D
    mean_grad_xhat_xhat = tl.sum(grad_xhat * xhat, axis=-1, keep_dims=True) / D
    return rstd * (grad_xhat - mean_grad_xhat - xhat * mean_grad_xhat_xhat), xhat


@triton.jit
def program_row(tokens, D, BLOCK_D: tl.constexpr):
    """(row, batch, token, columns, mask) of a forward program: the grid is (batch * tokens,), each
    program one token's row of D columns; int64 so that row * D cannot overflow on large batches
    of long sequences."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_D)
    return row, row // tokens, row % tokens, columns, columns < D


@triton.jit
def program_token_block(tokens, token_blocks, TOKENS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(program, batch, first_token, last_token, columns) of a backward program: the grid is
    (batch * token_blocks,), each program one block of one sample's tokens; int64 offsets."""
    program = tl.program_id(0).to(tl.int64)
    first_token = (program % token_blocks) * TOKENS_PER_PROGRAM
    last_token = tl.minimum(first_token + TOKENS_PER_PROGRAM, tokens)
    return program, program // token_blocks, first_token, last_token, tl.arange(0, BLOCK_D)


@triton.jit
def token_tile(tile_start, last_token, columns, D, TILE_TOKENS: tl.constexpr):
    """(token, mask) of the (TILE_TOKENS, columns) tile from tile_start: token is a column vector."""
    token = (tile_start + tl.arange(0, TILE_TOKENS))[:, None]
    return token, (token < last_token) & (columns[None, :] < D)


@triton.jit
def store_partial(partial_ptr, program, D, columns, tile_sums):
    """One program's fp32 partial row of a per-sample grad: the column sums of its tile accumulator."""
    tl.store(partial_ptr + program * D + columns, tl.sum(tile_sums, axis=0), mask=columns < D)


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


def row_tuning_key(x: torch.Tensor, out: torch.Tensor) -> tuple:
    """The shape class of a row launch over x (..., D): dtypes, the row length D and the bucket of its row count."""
    return x.dtype, out.dtype, x.shape[-1], size_bucket(math.prod(x.shape[:-1]))


def unit_stride_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels step through the hidden dim with stride 1; any other layout is copied once."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def per_sample_partials(batch: int, tokens: int, hidden_size: int, count: int, device) -> list[torch.Tensor]:
    """``count`` fp32 (batch, token blocks, hidden_size) buffers, one partial sum per backward program."""
    token_blocks = triton.cdiv(tokens, TOKENS_PER_PROGRAM)
    return [torch.empty((batch, token_blocks, hidden_size), dtype=torch.float32, device=device) for _ in range(count)]


def check_hidden_states(op: str, name: str, tensor: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Raise unless ``tensor`` is (batch, tokens, hidden_size) in a supported dtype (and fits ``like``, x)."""
    if tensor.dim() != 3:
        raise input_error(ValueError, op, name, "be 3-D (batch, tokens, hidden_size)", f"shape {tuple(tensor.shape)}")
    if like is None:
        check_supported_dtype(op, name, tensor)
        return
    if tensor.shape != like.shape:
        raise input_error(ValueError, op, name, f"have x's shape {tuple(like.shape)}", tuple(tensor.shape))
    check_compute_dtype(op, name, tensor, like)
    check_same_device(op, name, tensor, "x", like)


def check_compute_dtype(op: str, name: str, tensor: torch.Tensor, x: torch.Tensor) -> None:
    """Raise unless ``tensor`` has x's dtype, or a half dtype while x is fp32 (autocast's residual stream)."""
    if tensor.dtype == x.dtype or (x.dtype == torch.float32 and tensor.dtype in HALF_DTYPES):
        return
    raise input_error(TypeError, op, name, f"have x's dtype ({x.dtype}), or float16/bfloat16 when x is float32",
                      tensor.dtype)


def check_per_sample(op: str, name: str, vector: torch.Tensor, x: torch.Tensor, like_name: str,
                     like: torch.Tensor) -> None:
    """Raise unless ``vector`` is a (batch, hidden_size) per-sample vector for ``x`` in the dtype of ``like``."""
    expected = (x.shape[0], x.shape[2])
    if tuple(vector.shape) != expected:
        raise input_error(ValueError, op, name, f"have shape (batch, hidden_size) = {expected} to match x",
                          tuple(vector.shape))
    if vector.dtype != like.dtype:
        raise input_error(TypeError, op, name, f"have {like_name}'s dtype ({like.dtype})", vector.dtype)
    check_same_device(op, name, vector, "x", x)


def check_modulation(op: str, shift, scale, x, eps: float, like_name: str, like: torch.Tensor) -> None:
    """Raise unless shift/scale modulate ``x`` in the dtype of ``like`` and eps is a usable LayerNorm epsilon."""
    check_per_sample(op, "shift", shift, x, like_name, like)
    check_per_sample(op, "scale", scale, x, like_name, like)
    if not eps > 0:
        raise input_error(ValueError, op, "eps", "be positive", eps)

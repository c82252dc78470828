"""Flash attention forward for DiT self-attention: non-causal, no mask, no dropout.

softmax(q k^T * scale) v over (batch, tokens, heads, head_dim) tensors, computed block by
block with an online softmax (FlashAttention-2): a running row max and row sum in fp32,
exp2 with log2(e) folded into the scale, the accumulator rescaled when the max grows and
divided by the sum once at the end. The tokens x tokens score matrix is never stored.

q, k and v are read through their (batch, token, head) strides, so the views that
``qkv.view(B, T, 3, H, Dh).unbind(2)`` gives need no copy, and the output is written
contiguous (B, T, H, Dh) so that ``.view(B, T, H * Dh)`` feeds the output projection.
The tiles (16-byte stride units, the head dim split into a power-of-two part and a
padded tail) are shared with the backward: see attention_tiles.py.

The forward also writes each query row's logsumexp of the scaled scores (fp32,
(batch, heads, tokens)), from which the backward (attention_backward.py, registered below
as this op's autograd) recomputes the probabilities.
"""
import math

import torch
import triton
import triton.language as tl

from .attention_backward import attention_backward
from . import tuning
from .attention_tiles import (LOG2E, as_vector_aligned, check_grid, check_inputs, load_tile, program_qkv,
                              split_head_dim, store_tile, tile_shared_bytes, tuning_key, vector_strides)
from .interpreter import dot, to_storage
from .launch import ATTENTION_FP_FUSION, Config, config, dot_precision, offer, version_tiles, warpgroup_mma
from .runtime import device_guard, use_triton


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    tokens, heads, qk_scale_log2,
    # (batch, token, head) strides counted in VECTOR-element (16-byte) units: see attention_tiles.py.
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_MAIN: tl.constexpr, HEAD_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_KEYS: tl.constexpr, VECTOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    query_block, _, _, row_base, q_base, k_base, v_base, out_base = program_qkv(
        q_ptr, k_ptr, v_ptr, out_ptr, tokens, heads,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh, VECTOR)

    queries = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_main = tl.arange(0, HEAD_MAIN)
    q_main = load_tile(q_base, queries, stride_qt, tokens, cols_main, HEAD_DIM, VECTOR)
    out_main = tl.zeros([BLOCK_M, HEAD_MAIN], dtype=tl.float32)
    if HEAD_TAIL > 0:
        cols_tail = HEAD_MAIN + tl.arange(0, HEAD_TAIL)
        q_tail = load_tile(q_base, queries, stride_qt, tokens, cols_tail, HEAD_DIM, VECTOR)
        out_tail = tl.zeros([BLOCK_M, HEAD_TAIL], dtype=tl.float32)
    # Row max in log2 units (scores * scale * log2(e)) and row sum of exp2(score - max).
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    for key_start in range(0, tokens, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k_main = load_tile(k_base, keys, stride_kt, tokens, cols_main, HEAD_DIM, VECTOR)
        scores = dot(q_main, tl.trans(k_main), None, DOT_PRECISION)
        if HEAD_TAIL > 0:
            k_tail = load_tile(k_base, keys, stride_kt, tokens, cols_tail, HEAD_DIM, VECTOR)
            scores = dot(q_tail, tl.trans(k_tail), scores, DOT_PRECISION)
        if not EVEN_KEYS:
            # Padding keys read as zeros would score 0, not -inf: mask them before the max.
            scores = tl.where((keys < tokens)[None, :], scores, float("-inf"))
        # scale > 0 (checked by the op), so max(scores) * scale is the max of the scaled
        # scores and the scaling folds into one multiply-add per score.
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale_log2)
        probs = tl.exp2(scores * qk_scale_log2 - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        row_max = new_max

        v_main = load_tile(v_base, keys, stride_vt, tokens, cols_main, HEAD_DIM, VECTOR)
        # fp16/bf16: P is rounded to the input dtype for the tensor-core dot, as
        # FlashAttention does; fp32 keeps fp32 (and ieee dots) throughout.
        probs = to_storage(probs, v_main.dtype)
        out_main = dot(probs, v_main, out_main * rescale[:, None], DOT_PRECISION)
        if HEAD_TAIL > 0:
            v_tail = load_tile(v_base, keys, stride_vt, tokens, cols_tail, HEAD_DIM, VECTOR)
            out_tail = dot(probs, v_tail, out_tail * rescale[:, None], DOT_PRECISION)

    store_tile(out_base, queries, stride_ot, tokens, cols_main, HEAD_DIM, VECTOR, out_main / row_sum[:, None])
    if HEAD_TAIL > 0:
        store_tile(out_base, queries, stride_ot, tokens, cols_tail, HEAD_DIM, VECTOR, out_tail / row_sum[:, None])
    # Back from log2 units to the natural logsumexp that the op returns.
    lse = (row_max + tl.log2(row_sum)) / LOG2E
    tl.store(lse_ptr + row_base + queries, lse, mask=queries < tokens)


def _forward_candidates(tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> list[Config]:
    """Launch configurations of the forward: (BLOCK_M queries, BLOCK_N keys, warps, stages), the
    default first, each fitting the GPU's shared memory (``tile_shared_bytes``)."""
    if dtype == torch.float32:
        # ieee fp32 dots run on the FMA units, whose operand layout holds every k of a thread's
        # rows and columns in registers: small tiles keep them in bounds. 64x32 over 4 warps
        # spilled 140-772 B on sm_90 and sm_80, 32x64 up to 784 B on sm_90; 32x32 over 4 warps
        # and 64x32 over 8 do not (under Triton 3.6 both do at one head dim on sm_90, 3 stages not:
        # launch.TRITON_3_6_DEFAULTS). 16x32 with one stage is for head dims above 128 on
        # GPUs with 99 KiB of shared memory, where nothing larger fits.
        tiles = [(32, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 3), (16, 32, 4, 1)]
    elif head_dim <= 96 and not warpgroup_mma(device):
        # Ampere's mma.sync gives each warp 16 rows: 128x64 over 4 warps reached 255 registers
        # and spilled 4-40 B on sm_80 at head dims 64 and 72 (in a 258-token sequence as well
        # as at 256), over 8 warps with 3 stages still 20 B at head dim 64 and 258 tokens;
        # 8 warps with 2 stages do not spill.
        tiles = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3)]
    elif head_dim <= 128:
        # H100, bf16: 4 warps beat 8 by 1.3x at head dim 72 (T 256 and 4096) and tie at 64;
        # 8 warps keep the 128-wide accumulators of head dims above 96 in registers. Three
        # stages need ~128 KB of shared memory above head dim 96, more than sm_86/89's 99 KB:
        # the two-stage variant then is the default.
        warps = 8 if head_dim > 96 else 4
        tiles = [(128, 64, warps, 3), (128, 64, warps, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3)]
    else:
        tiles = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)]
    # Short sequences (DiT at low resolution): no block larger than the token count needs.
    fit = max(16, triton.next_power_of_2(tokens))
    candidates = [config(warps, stages, BLOCK_M=min(block_m, fit), BLOCK_N=min(block_n, fit))
                  for block_m, block_n, warps, stages in version_tiles(tiles, "attention_forward", dtype, device)]
    # The interpreter runs programs one after another in numpy: small blocks keep the padding
    # cheap at the tiny token counts the tests use.
    interpreted = config(4, 1, BLOCK_M=min(32, fit), BLOCK_N=min(32, fit))
    return offer(device, candidates, interpreted,
                 lambda c: tile_shared_bytes(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], head_dim, dtype))


def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, heads, head_dim = q.shape
    out = torch.empty((batch, tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, tokens), dtype=torch.float32, device=q.device)
    head_main, head_tail = split_head_dim(head_dim)
    check_grid("attention", batch, heads)
    vector = 16 // q.element_size()  # elements per 16-byte load; the op made every stride a multiple

    def launch(config):
        return _attention_fwd_kernel[(triton.cdiv(tokens, config["BLOCK_M"]), batch * heads)](
            q, k, v, out, lse,
            tokens, heads, softmax_scale * math.log2(math.e),
            *vector_strides(q, k, v, out),
            HEAD_DIM=head_dim, HEAD_MAIN=head_main, HEAD_TAIL=head_tail,
            EVEN_KEYS=tokens % config["BLOCK_N"] == 0, VECTOR=vector,
            DOT_PRECISION=dot_precision(q.dtype),
            **config, enable_fp_fusion=ATTENTION_FP_FUSION,
        )

    with device_guard(q):
        tuning.choose("attention_forward", tuning_key(q), _forward_candidates(tokens, head_dim, q.dtype, q.device),
                      launch, q.device)
    return out, lse


def attention_reference_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_reference's output, the fp32 logsumexp of each query row's scaled scores, (B, H, T))."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    # fp32 whatever the caller's autocast: a custom op's body runs under it, and autocast would run
    # these matmuls (and so lse) in bf16.
    with torch.autocast(q.device.type, enabled=False):
        q32, k32, v32 = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        scores = q32 @ k32.transpose(-1, -2) * scale
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None])
        return (probs @ v32).transpose(1, 2).to(q.dtype).contiguous(), lse


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v in fp32 on (B, T, H, Dh) tensors, cast to q's dtype."""
    return attention_reference_with_lse(q, k, v, softmax_scale)[0]


@torch.library.custom_op("fastdit::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention(q, k, v, softmax_scale), lse)``: lse is the fp32 logsumexp of each query
    row's scaled scores, (batch, heads, tokens), which the backward recomputes the
    probabilities from. Differentiable in q, k and v (not through lse)."""
    check_inputs(q, k, v, softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if not use_triton(q) or q.numel() == 0:
        return attention_reference_with_lse(q, k, v, scale)
    return _attention_triton(*(as_vector_aligned(t) for t in (q, k, v)), scale)


@attention_forward.register_fake
def _(q, k, v, softmax_scale=None):
    batch, tokens, heads, _ = q.shape
    lse = q.new_empty((batch, heads, tokens), dtype=torch.float32)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale


def _backward(ctx, grad_out, _grad_lse):  # lse is non-differentiable: its gradient is zero
    q, k, v, out, lse = ctx.saved_tensors
    return *attention_backward(grad_out, q, k, v, out, lse, ctx.softmax_scale), None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * softmax_scale) v per (batch, head), non-causal, differentiable.

    q, k, v: (batch, tokens, heads, head_dim), read in place through their strides when
    head_dim has unit stride and rows start 16-byte aligned (else copied first: the one
    copy this op may make); head_dim a multiple of 8, at most 256. softmax_scale defaults to head_dim ** -0.5 and must be positive.
    Returns a new contiguous (batch, tokens, heads, head_dim) tensor in q's dtype.
    """
    return attention_forward(q, k, v, softmax_scale)[0]

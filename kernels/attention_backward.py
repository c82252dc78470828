"""Flash attention backward (FlashAttention-2): the gradients of attention.py's forward.

With P = softmax(S), S = q k^T * scale and dO the output's gradient:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q,
where delta = rowsum(dO * O) equals rowsum(P * dP) and needs no (T, T) product. P is
recomputed block by block from q, k and the forward's row logsumexp, so the backward
stores no (T, T) matrix either. Three launches, no atomics (deterministic):
1. delta per query row;
2. one program per key block: loops over query blocks, accumulates dK and dV in registers;
3. one program per query block: loops over key blocks, accumulates dQ in registers.
The head-dim split (main + tail), the strided (B, T, H, Dh) reads and the 16-byte stride
units are the forward's (see attention_tiles.py). attention.py registers this op as the
forward's autograd.
"""
import math

import torch
import triton
import triton.language as tl

from . import tuning
from .attention_tiles import (LOG2E, as_vector_aligned, check_grid, check_inputs, head_base, load_tile, program_head,
                              program_qkv, split_head_dim, store_tile, tile_shared_bytes, tuning_key, vector_strides)
from .interpreter import dot, to_storage
from .launch import ATTENTION_FP_FUSION, Config, config, dot_precision, input_error, offer, version_tiles
from .runtime import device_guard, use_triton


@triton.jit
def _attention_bwd_delta_kernel(
    out_ptr, grad_out_ptr, delta_ptr, tokens, heads,
    stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, stride_gh,
    HEAD_DIM: tl.constexpr, HEAD_MAIN: tl.constexpr, HEAD_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, VECTOR: tl.constexpr,
):
    query_block, batch, head, row_base = program_head(tokens, heads)
    out_base = head_base(out_ptr, batch, head, stride_ob, stride_oh, VECTOR)
    grad_base = head_base(grad_out_ptr, batch, head, stride_gb, stride_gh, VECTOR)
    queries = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_main = tl.arange(0, HEAD_MAIN)
    out_main = load_tile(out_base, queries, stride_ot, tokens, cols_main, HEAD_DIM, VECTOR).to(tl.float32)
    grad_main = load_tile(grad_base, queries, stride_gt, tokens, cols_main, HEAD_DIM, VECTOR).to(tl.float32)
    delta = tl.sum(out_main * grad_main, 1)
    if HEAD_TAIL > 0:
        cols_tail = HEAD_MAIN + tl.arange(0, HEAD_TAIL)
        out_tail = load_tile(out_base, queries, stride_ot, tokens, cols_tail, HEAD_DIM, VECTOR).to(tl.float32)
        grad_tail = load_tile(grad_base, queries, stride_gt, tokens, cols_tail, HEAD_DIM, VECTOR).to(tl.float32)
        delta += tl.sum(out_tail * grad_tail, 1)
    tl.store(delta_ptr + row_base + queries, delta, mask=queries < tokens)


# The key and query kernels spell out the forward's argument list and its program_qkv call again: a Triton
# kernel takes each pointer, stride and constexpr as an argument of its own, and they are its launch signature.
@triton.jit
def _attention_bwd_key_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    tokens, heads, softmax_scale, qk_scale_log2,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    HEAD_DIM: tl.constexpr, HEAD_MAIN: tl.constexpr, HEAD_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VECTOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    key_block, batch, head, row_base, q_base, k_base, v_base, grad_base = program_qkv(
        q_ptr, k_ptr, v_ptr, grad_out_ptr, tokens, heads,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh, VECTOR)

    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_main = tl.arange(0, HEAD_MAIN)
    k_main = load_tile(k_base, keys, stride_kt, tokens, cols_main, HEAD_DIM, VECTOR)
    v_main = load_tile(v_base, keys, stride_vt, tokens, cols_main, HEAD_DIM, VECTOR)
    grad_k_main = tl.zeros([BLOCK_N, HEAD_MAIN], dtype=tl.float32)
    grad_v_main = tl.zeros([BLOCK_N, HEAD_MAIN], dtype=tl.float32)
    if HEAD_TAIL > 0:
        cols_tail = HEAD_MAIN + tl.arange(0, HEAD_TAIL)
        k_tail = load_tile(k_base, keys, stride_kt, tokens, cols_tail, HEAD_DIM, VECTOR)
        v_tail = load_tile(v_base, keys, stride_vt, tokens, cols_tail, HEAD_DIM, VECTOR)
        grad_k_tail = tl.zeros([BLOCK_N, HEAD_TAIL], dtype=tl.float32)
        grad_v_tail = tl.zeros([BLOCK_N, HEAD_TAIL], dtype=tl.float32)

    for query_start in range(0, tokens, BLOCK_M):
        queries = query_start + tl.arange(0, BLOCK_M)
        q_main = load_tile(q_base, queries, stride_qt, tokens, cols_main, HEAD_DIM, VECTOR)
        grad_main = load_tile(grad_base, queries, stride_gt, tokens, cols_main, HEAD_DIM, VECTOR)
        # Padding queries read lse = +inf: their probabilities come out exactly 0.
        lse_log2 = tl.load(lse_ptr + row_base + queries, mask=queries < tokens, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + row_base + queries, mask=queries < tokens, other=0.0)
        # Transposed (keys x queries) blocks, so that dK and dV come out of plain dots.
        scores_t = dot(k_main, tl.trans(q_main), None, DOT_PRECISION)
        grad_probs_t = dot(v_main, tl.trans(grad_main), None, DOT_PRECISION)
        if HEAD_TAIL > 0:
            q_tail = load_tile(q_base, queries, stride_qt, tokens, cols_tail, HEAD_DIM, VECTOR)
            grad_tail = load_tile(grad_base, queries, stride_gt, tokens, cols_tail, HEAD_DIM, VECTOR)
            scores_t = dot(k_tail, tl.trans(q_tail), scores_t, DOT_PRECISION)
            grad_probs_t = dot(v_tail, tl.trans(grad_tail), grad_probs_t, DOT_PRECISION)
        probs_t = tl.exp2(scores_t * qk_scale_log2 - lse_log2[None, :])
        # fp16/bf16: P and dS are rounded to the input dtype for the tensor-core dots, as
        # in the forward; fp32 keeps fp32.
        grad_scores_t = to_storage(probs_t * (grad_probs_t - delta[None, :]), q_main.dtype)
        probs_t = to_storage(probs_t, q_main.dtype)
        grad_v_main = dot(probs_t, grad_main, grad_v_main, DOT_PRECISION)
        grad_k_main = dot(grad_scores_t, q_main, grad_k_main, DOT_PRECISION)
        if HEAD_TAIL > 0:
            grad_v_tail = dot(probs_t, grad_tail, grad_v_tail, DOT_PRECISION)
            grad_k_tail = dot(grad_scores_t, q_tail, grad_k_tail, DOT_PRECISION)

    grad_k_base = head_base(grad_k_ptr, batch, head, stride_dkb, stride_dkh, VECTOR)
    grad_v_base = head_base(grad_v_ptr, batch, head, stride_dvb, stride_dvh, VECTOR)
    store_tile(grad_k_base, keys, stride_dkt, tokens, cols_main, HEAD_DIM, VECTOR, grad_k_main * softmax_scale)
    store_tile(grad_v_base, keys, stride_dvt, tokens, cols_main, HEAD_DIM, VECTOR, grad_v_main)
    if HEAD_TAIL > 0:
        store_tile(grad_k_base, keys, stride_dkt, tokens, cols_tail, HEAD_DIM, VECTOR, grad_k_tail * softmax_scale)
        store_tile(grad_v_base, keys, stride_dvt, tokens, cols_tail, HEAD_DIM, VECTOR, grad_v_tail)


@triton.jit
def _attention_bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr,
    tokens, heads, softmax_scale, qk_scale_log2,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_dqb, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, HEAD_MAIN: tl.constexpr, HEAD_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_KEYS: tl.constexpr, VECTOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    query_block, batch, head, row_base, q_base, k_base, v_base, grad_base = program_qkv(
        q_ptr, k_ptr, v_ptr, grad_out_ptr, tokens, heads,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_gb, stride_gh, VECTOR)

    queries = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_main = tl.arange(0, HEAD_MAIN)
    q_main = load_tile(q_base, queries, stride_qt, tokens, cols_main, HEAD_DIM, VECTOR)
    grad_main = load_tile(grad_base, queries, stride_gt, tokens, cols_main, HEAD_DIM, VECTOR)
    grad_q_main = tl.zeros([BLOCK_M, HEAD_MAIN], dtype=tl.float32)
    if HEAD_TAIL > 0:
        cols_tail = HEAD_MAIN + tl.arange(0, HEAD_TAIL)
        q_tail = load_tile(q_base, queries, stride_qt, tokens, cols_tail, HEAD_DIM, VECTOR)
        grad_tail = load_tile(grad_base, queries, stride_gt, tokens, cols_tail, HEAD_DIM, VECTOR)
        grad_q_tail = tl.zeros([BLOCK_M, HEAD_TAIL], dtype=tl.float32)
    lse_log2 = tl.load(lse_ptr + row_base + queries, mask=queries < tokens, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + row_base + queries, mask=queries < tokens, other=0.0)

    for key_start in range(0, tokens, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k_main = load_tile(k_base, keys, stride_kt, tokens, cols_main, HEAD_DIM, VECTOR)
        v_main = load_tile(v_base, keys, stride_vt, tokens, cols_main, HEAD_DIM, VECTOR)
        scores = dot(q_main, tl.trans(k_main), None, DOT_PRECISION)
        grad_probs = dot(grad_main, tl.trans(v_main), None, DOT_PRECISION)
        if HEAD_TAIL > 0:
            k_tail = load_tile(k_base, keys, stride_kt, tokens, cols_tail, HEAD_DIM, VECTOR)
            v_tail = load_tile(v_base, keys, stride_vt, tokens, cols_tail, HEAD_DIM, VECTOR)
            scores = dot(q_tail, tl.trans(k_tail), scores, DOT_PRECISION)
            grad_probs = dot(grad_tail, tl.trans(v_tail), grad_probs, DOT_PRECISION)
        if not EVEN_KEYS:
            # Padding keys score 0, which may exceed a row's logsumexp by enough to overflow exp2.
            scores = tl.where((keys < tokens)[None, :], scores, float("-inf"))
        probs = tl.exp2(scores * qk_scale_log2 - lse_log2[:, None])
        grad_scores = to_storage(probs * (grad_probs - delta[:, None]), q_main.dtype)
        grad_q_main = dot(grad_scores, k_main, grad_q_main, DOT_PRECISION)
        if HEAD_TAIL > 0:
            grad_q_tail = dot(grad_scores, k_tail, grad_q_tail, DOT_PRECISION)

    grad_q_base = head_base(grad_q_ptr, batch, head, stride_dqb, stride_dqh, VECTOR)
    store_tile(grad_q_base, queries, stride_dqt, tokens, cols_main, HEAD_DIM, VECTOR, grad_q_main * softmax_scale)
    if HEAD_TAIL > 0:
        store_tile(grad_q_base, queries, stride_dqt, tokens, cols_tail, HEAD_DIM, VECTOR, grad_q_tail * softmax_scale)


def _backward_candidates(tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> list[Config]:
    """Launch configurations of the dK/dV and dQ kernels: OUTER is the block a program owns
    (keys for dK/dV, queries for dQ), INNER the block it loops over. The defaults compile
    without register spills for sm_90 and sm_80 at DiT's head dims (64, 72) in every dtype,
    under the Triton versions docs/kernels.md lists (Triton 3.6 with one exception:
    launch.TRITON_3_6_DEFAULTS); the alternatives are larger tiles that pay off where
    they fit in registers (tuning prunes those that spill)."""
    if dtype == torch.float32:
        # ieee dots on the FMA units. 32/32 over 8 warps with 1 stage spilled 4-8 B in the dK/dV
        # kernel on sm_80 at head dim 64 (ptxas kept it at 80 registers). Over 4 warps with 2
        # stages neither kernel spilled under Triton 3.9, but on sm_90 with a token count that 32
        # does not divide 3.7 spills 16 B in dK/dV at head dim 64 and 3.8 16 B in dQ at head dim
        # 72; 64/32 over 8 warps keeps both within 222 registers on both GPUs at head dims 64 and
        # 72 under 3.6 to 3.9 (docs/kernels.md, "Triton versions"). 16x16 is for head dims above
        # 128 on GPUs with 99 KiB of shared memory, where nothing larger fits.
        tiles = [(64, 32, 8, 1), (32, 32, 4, 2), (32, 32, 8, 1), (16, 16, 4, 1)]
    elif head_dim <= 80:  # a 64 + 16 split at most (DiT's 64 and 72)
        tiles = [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2), (32, 32, 4, 2)]
    else:
        # The dK/dV program holds two fp32 (outer, head_dim) accumulators plus its K and V
        # tiles: smaller blocks over 8 warps keep them in registers.
        tiles = [(32, 32, 8, 1), (64, 32, 8, 1), (32, 32, 4, 2)]
    fit = max(16, triton.next_power_of_2(tokens))
    candidates = [config(warps, stages, OUTER=min(outer, fit), INNER=min(inner, fit))
                  for outer, inner, warps, stages in version_tiles(tiles, "attention_backward", dtype, device)]
    # Unequal blocks, so that the tests would catch a kernel mixing them up.
    interpreted = config(4, 1, OUTER=min(64, fit), INNER=min(32, fit))
    # A program keeps two (OUTER, head_dim) tiles and streams two (INNER, head_dim) ones.
    return offer(device, candidates, interpreted,
                 lambda c: tile_shared_bytes(2 * c["OUTER"], c["INNER"], c["num_stages"], head_dim, dtype))


def _blocks(config: Config, owned: str, looped: str) -> Config:
    """The kernel's keyword arguments for a backward candidate: OUTER and INNER named as the kernel names them."""
    return {owned: config["OUTER"], looped: config["INNER"],
            "num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def _attention_backward_triton(grad_out, q, k, v, out, lse, softmax_scale):
    batch, tokens, heads, head_dim = q.shape
    check_grid("attention_backward", batch, heads)
    head_main, head_tail = split_head_dim(head_dim)
    grad_q, grad_k, grad_v = (torch.empty((batch, tokens, heads, head_dim), dtype=q.dtype, device=q.device)
                              for _ in range(3))
    delta = torch.empty((batch, heads, tokens), dtype=torch.float32, device=q.device)
    vector = 16 // q.element_size()
    head_args = dict(HEAD_DIM=head_dim, HEAD_MAIN=head_main, HEAD_TAIL=head_tail, VECTOR=vector,
                     enable_fp_fusion=ATTENTION_FP_FUSION)
    dot_args = dict(DOT_PRECISION=dot_precision(q.dtype))
    scales = (softmax_scale, softmax_scale * math.log2(math.e))
    key = tuning_key(q)
    candidates = _backward_candidates(tokens, head_dim, q.dtype, q.device)

    # One program per block of every (batch, head) in each kernel.
    def grid(block: int) -> tuple[int, int]:
        return triton.cdiv(tokens, block), batch * heads

    def launch_delta(config):
        return _attention_bwd_delta_kernel[grid(config["BLOCK_M"])](
            out, grad_out, delta, tokens, heads, *vector_strides(out, grad_out), **head_args, **config)

    def launch_key(config):
        return _attention_bwd_key_kernel[grid(config["OUTER"])](
            q, k, v, grad_out, lse, delta, grad_k, grad_v, tokens, heads, *scales,
            *vector_strides(q, k, v, grad_out, grad_k, grad_v),
            **_blocks(config, "BLOCK_N", "BLOCK_M"), **head_args, **dot_args)

    def launch_query(config):
        return _attention_bwd_query_kernel[grid(config["OUTER"])](
            q, k, v, grad_out, lse, delta, grad_q, tokens, heads, *scales,
            *vector_strides(q, k, v, grad_out, grad_q), **_blocks(config, "BLOCK_M", "BLOCK_N"),
            EVEN_KEYS=tokens % config["INNER"] == 0, **head_args, **dot_args)

    with device_guard(q):
        # The delta kernel only reads two tiles per program and sums them: one configuration.
        tuning.choose("attention_backward_delta", key, [config(4, 1, BLOCK_M=candidates[0]["OUTER"])],
                      launch_delta, q.device)
        tuning.choose("attention_backward_key", key, candidates, launch_key, q.device)
        tuning.choose("attention_backward_query", key, candidates, launch_query, q.device)
    return grad_q, grad_k, grad_v


def attention_backward_reference(grad_out, q, k, v, out, lse, softmax_scale):
    """(grad_q, grad_k, grad_v) in fp32 torch math, P recomputed from lse, cast to q's dtype."""
    q32, k32, v32, grad_out32, out32 = (t.float().transpose(1, 2) for t in (q, k, v, grad_out, out))  # (B, H, T, Dh)
    probs = torch.exp(q32 @ k32.transpose(-1, -2) * softmax_scale - lse[..., None])
    delta = (grad_out32 * out32).sum(-1, keepdim=True)
    grad_scores = probs * (grad_out32 @ v32.transpose(-1, -2) - delta) * softmax_scale
    grads = (grad_scores @ k32, grad_scores.transpose(-1, -2) @ q32, probs.transpose(-1, -2) @ grad_out32)
    return tuple(g.transpose(1, 2).to(q.dtype).contiguous() for g in grads)


@torch.library.custom_op("fastdit::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor,
                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v) of attention_forward(q, k, v, softmax_scale) = (out, lse) for
    the output gradient grad_out; new contiguous (batch, tokens, heads, head_dim) tensors in q's dtype."""
    check_inputs(q, k, v, softmax_scale)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise input_error(ValueError, "attention_backward", name, f"have q's shape {tuple(q.shape)} and dtype "
                              f"({q.dtype})", f"{tuple(t.shape)} {t.dtype}")
    batch, tokens, heads, _ = q.shape
    if lse.shape != (batch, heads, tokens) or lse.dtype != torch.float32:
        raise input_error(ValueError, "attention_backward", "lse", f"be float32 of shape {(batch, heads, tokens)}",
                          f"{lse.dtype} {tuple(lse.shape)}")
    if not use_triton(q) or q.numel() == 0:
        return attention_backward_reference(grad_out, q, k, v, out, lse, softmax_scale)
    grad_out, q, k, v, out = (as_vector_aligned(t) for t in (grad_out, q, k, v, out))
    return _attention_backward_triton(grad_out, q, k, v, out, lse.contiguous(), softmax_scale)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, softmax_scale):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


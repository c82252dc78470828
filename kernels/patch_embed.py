"""Patch embedding: DiT's patchify conv, flatten to tokens and position embedding, fused.

The conv has kernel = stride = p, so it is a GEMM over non-overlapping patches:
``tokens (B*T, K) @ weight (K, D)`` with ``K = C*p*p``. The kernel gathers each patch
straight from the image in its A-operand load (no patchified copy of x), reads the conv
weight through its strides as the (K, D) B operand (no transpose copy), accumulates in
fp32 and adds bias and pos_embed in the epilogue before the single rounding to the output dtype.

Dtypes follow autocast: x and weight share the GEMM's dtype, bias and pos_embed share the
output's (fp32 under bf16 autocast, where the residual stream stays fp32).

The backward is two more GEMMs over the same gather: grad_x = grad_out @ W^T stored through
the inverse of the forward's gather (patches do not overlap, so each pixel is written once),
and grad_weight = grad_out^T @ patches reduced over all B*T rows in fixed chunks of fp32
partial sums (the same kernel sums grad_out's rows for grad_bias), then summed in order:
deterministic, no atomics.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tuning
from .interpreter import dot, to_storage
from .launch import (PATCH_EMBED_FP_FUSION, Config, check_same_device, check_supported_dtype, config, dot_precision,
                     input_error, offer, size_bucket)
from .runtime import TRITON_INTERPRET, device_guard, use_triton


@triton.jit
def _patch_row_offsets(row_indices, tokens, patches_per_row, stride_b, stride_h, stride_w, PATCH: tl.constexpr):
    """Offset of each row's patch corner: row = (batch, token), token = hp * (W/p) + wp (the
    conv output flattened row-major); int64 so that large batches of large images cannot
    overflow the address arithmetic."""
    batch = row_indices // tokens
    token = row_indices % tokens
    patch_h = token // patches_per_row
    patch_w = token % patches_per_row
    return (batch.to(tl.int64) * stride_b + (patch_h * PATCH).to(tl.int64) * stride_h
            + (patch_w * PATCH).to(tl.int64) * stride_w)


@triton.jit
def _patch_column_offsets(columns, stride_c, stride_i, stride_j, PATCH: tl.constexpr):
    """Offset of each column k = c*p*p + i*p + j within a patch: the order of weight.view(D, C*p*p)."""
    channel = columns // (PATCH * PATCH)
    within = columns % (PATCH * PATCH)
    return channel * stride_c + (within // PATCH) * stride_i + (within % PATCH) * stride_j


@triton.jit
def _as_operand(block, dtype: tl.constexpr):
    """``block`` in ``dtype``, the dots' operand dtype: under autocast grad_out comes in fp32
    while x and weight are bf16, and is rounded as autocast's conv backward rounds it."""
    if block.dtype != dtype:
        block = to_storage(block.to(tl.float32), dtype)
    return block


@triton.jit
def _patch_embed_kernel(
    x_ptr, weight_ptr, bias_ptr, pos_ptr, out_ptr,
    rows, tokens, patches_per_row, in_features, hidden_size,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wd, stride_wc, stride_wi, stride_wj,
    stride_bias, stride_pos_t, stride_pos_d,
    PATCH: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < hidden_size

    row_offsets = _patch_row_offsets(offs_m, tokens, patches_per_row, stride_xb, stride_xh, stride_xw, PATCH)
    col_offsets_w = offs_n.to(tl.int64) * stride_wd

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_features
        k_offsets_x = _patch_column_offsets(offs_k, stride_xc, stride_xh, stride_xw, PATCH)
        k_offsets_w = _patch_column_offsets(offs_k, stride_wc, stride_wi, stride_wj, PATCH)
        # Masked-off k columns load as zeros on both sides, so K pads up to tl.dot's minimum of 16.
        a = tl.load(x_ptr + row_offsets[:, None] + k_offsets_x[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(weight_ptr + k_offsets_w[:, None] + col_offsets_w[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, b, acc, INPUT_PRECISION)

    bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)
    # pos_embed is shared by every image of the batch: index it by token, not by row.
    token = offs_m % tokens
    pos = tl.load(pos_ptr + token[:, None].to(tl.int64) * stride_pos_t + offs_n[None, :] * stride_pos_d,
                  mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    acc += bias[None, :] + pos
    out_offsets = offs_m[:, None].to(tl.int64) * hidden_size + offs_n[None, :]
    tl.store(out_ptr + out_offsets, to_storage(acc, out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _patch_embed_grad_x_kernel(
    grad_out_ptr, weight_ptr, grad_x_ptr,
    rows, tokens, patches_per_row, in_features, hidden_size,
    stride_wd, stride_wc, stride_wi, stride_wj,
    stride_xb, stride_xc, stride_xh, stride_xw,
    PATCH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_patches (rows, K) = grad_out (rows, D) @ W^T (D, K), scattered into grad_x."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_k = offs_k < in_features
    k_offsets_w = _patch_column_offsets(offs_k, stride_wc, stride_wi, stride_wj, PATCH)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n_start in range(0, hidden_size, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hidden_size
        weight_t = tl.load(weight_ptr + offs_n[:, None].to(tl.int64) * stride_wd + k_offsets_w[None, :],
                           mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        grad = tl.load(grad_out_ptr + offs_m[:, None].to(tl.int64) * hidden_size + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = dot(_as_operand(grad, weight_t.dtype), weight_t, acc, INPUT_PRECISION)
    row_offsets = _patch_row_offsets(offs_m, tokens, patches_per_row, stride_xb, stride_xh, stride_xw, PATCH)
    k_offsets_x = _patch_column_offsets(offs_k, stride_xc, stride_xh, stride_xw, PATCH)
    tl.store(grad_x_ptr + row_offsets[:, None] + k_offsets_x[None, :], to_storage(acc, grad_x_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _patch_embed_grad_weight_kernel(
    x_ptr, grad_out_ptr, partial_weight_ptr, partial_bias_ptr,
    rows, chunk_rows, tokens, patches_per_row, in_features, hidden_size,
    stride_xb, stride_xc, stride_xh, stride_xw,
    PATCH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One chunk's fp32 partial sums: grad_out^T (D, rows) @ patches (rows, K) into
    partial_weight[chunk] (D, K), and grad_out's column sums into partial_bias[chunk] (D,).

    The hidden size is the dot's M side: a (BLOCK_N, BLOCK_K) tile has BLOCK_N >= 64 rows,
    which sm_90's wgmma needs (K is only 16 for DiT, too few rows the other way round)."""
    chunk = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < hidden_size
    mask_k = offs_k < in_features
    k_offsets_x = _patch_column_offsets(offs_k, stride_xc, stride_xh, stride_xw, PATCH)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m_start in range(0, chunk_rows, BLOCK_M):
        offs_m = chunk * chunk_rows + m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < rows
        row_offsets = _patch_row_offsets(offs_m, tokens, patches_per_row, stride_xb, stride_xh, stride_xw, PATCH)
        patches = tl.load(x_ptr + row_offsets[:, None] + k_offsets_x[None, :],
                          mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        grad = tl.load(grad_out_ptr + offs_m[:, None].to(tl.int64) * hidden_size + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = dot(tl.trans(_as_operand(grad, patches.dtype)), patches, acc, INPUT_PRECISION)
        if tl.program_id(2) == 0:
            # grad_bias from grad_out as it came, not rounded to the dots' dtype.
            bias_acc += tl.sum(grad.to(tl.float32), 0)
    partial = partial_weight_ptr + chunk.to(tl.int64) * hidden_size * in_features
    tl.store(partial + offs_n[:, None] * in_features + offs_k[None, :], acc, mask=mask_n[:, None] & mask_k[None, :])
    if tl.program_id(2) == 0:
        tl.store(partial_bias_ptr + chunk.to(tl.int64) * hidden_size + offs_n, bias_acc, mask=mask_n)


# Candidate tiles per kernel and operand dtype: (BLOCK_M, BLOCK_N, num_warps, num_stages), the
# default first. K is tiny (16..256: BLOCK_K covers it in one or a few steps), so each op is mostly
# writing or reading a (B*T, D) tensor: the tiles trade programs in flight against the reuse of
# the operand tiles. Half-precision defaults: a sweep on an H100 (DiT-XL/2 shapes) picked 64x128
# for the forward. fp32 (ieee dots on the FMA units, whose operand layout holds every k of a
# thread's rows and columns in registers): 64x64 over 4 warps, the largest tile that ptxas
# compiles without spills on sm_90 and sm_80 (128x64 spilled 28 B forward on sm_90, 332 B in
# grad_x on sm_80). BLOCK_M is the rows of the output (forward, grad_x) or the reduction step
# over rows (grad_weight, whose own tile is BLOCK_N x BLOCK_K). Under autocast (half operands,
# fp32 bias, pos_embed and output) the forward's epilogue holds an fp32 pos_embed tile beside the
# accumulator: 64x128 over 4 warps spilled 8 B on sm_80, the same tile per warp over 8 warps
# (128x128) does not.
_HALF_TILES = {
    "forward": [(64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    "forward_fp32_out": [(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)],
    "grad_x": [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    "grad_weight": [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
}
_FP32_TILES = {
    "forward": [(64, 64, 4, 3), (128, 64, 8, 3), (32, 128, 4, 3)],
    "grad_x": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
    "grad_weight": [(64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
}


def _candidates(op: str, in_features: int, dtype: torch.dtype, device: torch.device) -> list[Config]:
    """Launch configurations of one of the patch-embed kernels (an op of the tables above) for
    operands of ``dtype``."""
    block_k = min(32, max(16, triton.next_power_of_2(in_features)))
    tiles = _FP32_TILES if dtype == torch.float32 else _HALF_TILES
    # Interpreted: few programs keep the interpreter fast (it pays per block operation, not per
    # element); BLOCK_M=32 and BLOCK_K=32 still exercise the row and K loops and their tails.
    interpreted = config(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=block_k)
    return offer(device, [config(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
                          for block_m, block_n, warps, stages in tiles[op]], interpreted)


def _tuning_key(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> tuple:
    rows, _, _, in_features, hidden_size = _gemm_shape(x, weight)
    return x.dtype, out_dtype, in_features, hidden_size, size_bucket(rows)


def _gemm_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(rows, tokens, patches_per_row, in_features, hidden_size) of the patch GEMM."""
    batch, channels, height, width = x.shape
    hidden_size, _, patch, _ = weight.shape
    tokens = (height // patch) * (width // patch)
    return batch * tokens, tokens, width // patch, channels * patch * patch, hidden_size


def _patch_embed_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        pos_embed: torch.Tensor) -> torch.Tensor:
    rows, tokens, patches_per_row, in_features, hidden_size = _gemm_shape(x, weight)
    out = torch.empty((x.shape[0], tokens, hidden_size), dtype=pos_embed.dtype, device=x.device)
    if rows == 0 or hidden_size == 0:
        return out
    pos = pos_embed[0] if pos_embed.dim() == 3 else pos_embed

    def launch(config):
        grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(hidden_size, config["BLOCK_N"]))
        return _patch_embed_kernel[grid](
            x, weight, bias, pos, out,
            rows, tokens, patches_per_row, in_features, hidden_size,
            *x.stride(), *weight.stride(),
            bias.stride(0), pos.stride(0), pos.stride(1),
            PATCH=weight.shape[-1], INPUT_PRECISION=dot_precision(x.dtype),
            **config, enable_fp_fusion=PATCH_EMBED_FP_FUSION,
        )

    op = "forward_fp32_out" if out.dtype.itemsize > x.dtype.itemsize else "forward"
    with device_guard(x):
        tuning.choose("patch_embed", _tuning_key(x, weight, out.dtype), _candidates(op, in_features, x.dtype, x.device),
                      launch, x.device)
    return out


def _weight_chunk_rows(rows: int, block_m: int, parallel_tiles: int) -> int:
    """Rows per grad_weight chunk, a multiple of BLOCK_M fixed by the shapes alone: enough
    chunks that about 512 programs (4 per H100 SM) share the reduction. Interpreted: two, so
    that the test sizes exercise the reduction of partial sums."""
    chunks = 2 if TRITON_INTERPRET else max(1, 512 // parallel_tiles)
    return block_m * max(1, triton.cdiv(triton.cdiv(rows, chunks), block_m))


def _patch_embed_backward_triton(grad_out, x, weight, bias, pos_embed, output_mask):
    """patch_embed_backward's four gradients, None where output_mask is False; grad_out contiguous."""
    rows, tokens, patches_per_row, in_features, hidden_size = _gemm_shape(x, weight)
    need_x, need_weight, need_bias, need_pos = output_mask
    common = dict(PATCH=weight.shape[-1], INPUT_PRECISION=dot_precision(x.dtype),
                  enable_fp_fusion=PATCH_EMBED_FP_FUSION)
    key = _tuning_key(x, weight, grad_out.dtype)
    grad_x = grad_weight = grad_bias = grad_pos = None
    if need_x:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)

        def launch_grad_x(config):
            grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(in_features, config["BLOCK_K"]))
            return _patch_embed_grad_x_kernel[grid](
                grad_out, weight, grad_x, rows, tokens, patches_per_row, in_features, hidden_size,
                *weight.stride(), *grad_x.stride(), **common, **config)

        with device_guard(x):
            tuning.choose("patch_embed_grad_x", key, _candidates("grad_x", in_features, x.dtype, x.device),
                          launch_grad_x, x.device)
    if need_weight or need_bias:
        # The partial sums are sized by the chunks, which depend on the tile: the launch that
        # runs last (the chosen configuration) leaves its buffers here.
        partials = {}

        def launch_grad_weight(config):
            tiles = (triton.cdiv(hidden_size, config["BLOCK_N"]), triton.cdiv(in_features, config["BLOCK_K"]))
            chunk_rows = _weight_chunk_rows(rows, config["BLOCK_M"], tiles[0] * tiles[1])
            chunks = triton.cdiv(rows, chunk_rows)
            partials["weight"] = torch.empty((chunks, hidden_size, in_features), dtype=torch.float32, device=x.device)
            partials["bias"] = torch.empty((chunks, hidden_size), dtype=torch.float32, device=x.device)
            return _patch_embed_grad_weight_kernel[(chunks, *tiles)](
                x, grad_out, partials["weight"], partials["bias"], rows, chunk_rows, tokens, patches_per_row,
                in_features, hidden_size, *x.stride(), **common, **config)

        with device_guard(x):
            tuning.choose("patch_embed_grad_weight", key, _candidates("grad_weight", in_features, x.dtype, x.device),
                          launch_grad_weight, x.device)
        grad_weight = partials["weight"].sum(0).view(weight.shape).to(weight.dtype)
        grad_bias = partials["bias"].sum(0).to(bias.dtype)
    if need_pos:
        # DiT's pos_embed is frozen; a plain batch sum serves the models that train theirs.
        grad_pos = grad_out.sum(0, dtype=torch.float32).reshape(pos_embed.shape).to(pos_embed.dtype)
    return grad_x, grad_weight, grad_bias, grad_pos


def patch_embed_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          pos_embed: torch.Tensor) -> torch.Tensor:
    """Conv2d(kernel = stride = p), flatten to (B, T, D), add pos_embed; fp32 math, one rounding."""
    patch = weight.shape[-1]
    tokens = F.conv2d(x.float(), weight.float(), bias.float(), stride=patch).flatten(2).transpose(1, 2)
    # Contiguous (B, T, D), as the kernel writes it and the op's fake promises: the transposed conv output
    # would otherwise carry its (B, D, T) strides into compiled graphs, which check them.
    return (tokens + pos_embed.float()).to(pos_embed.dtype).contiguous()


def patch_embed_backward_reference(grad_out, x, weight, bias, pos_embed):
    """(grad_x, grad_weight, grad_bias, grad_pos_embed) of patch_embed_reference in fp32 math,
    each cast to its input's dtype: patches are F.unfold's columns, grad_x folds them back."""
    patch = weight.shape[-1]
    grad = grad_out.float()  # (B, T, D)
    patches = F.unfold(x.float(), patch, stride=patch)  # (B, K, T), K = C*p*p in weight.view(D, K)'s order
    grad_patches = weight.float().flatten(1).t() @ grad.transpose(1, 2)  # (K, D) @ (B, D, T)
    grad_x = F.fold(grad_patches, x.shape[-2:], patch, stride=patch)
    grad_weight = (grad.transpose(1, 2) @ patches.transpose(1, 2)).sum(0).view(weight.shape)
    grads = grad_x, grad_weight, grad.sum((0, 1)), grad.sum(0).reshape(pos_embed.shape)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (x, weight, bias, pos_embed)))


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor) -> None:
    op = "patch_embed"
    if x.dim() != 4:
        raise input_error(ValueError, op, "x", "be 4-D (B, C, H, W)", f"shape {tuple(x.shape)}")
    check_supported_dtype(op, "x", x)
    check_supported_dtype(op, "bias", bias)
    for name, tensor, like, like_name in (("weight", weight, x, "x"), ("pos_embed", pos_embed, bias, "bias")):
        if tensor.dtype != like.dtype:
            raise input_error(TypeError, op, name, f"have {like_name}'s dtype ({like.dtype})", tensor.dtype)
    for name, tensor in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        check_same_device(op, name, tensor, "x", x)
    batch, channels, height, width = x.shape
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise input_error(ValueError, op, "weight", "be (D, C, p, p) with a square kernel",
                          f"shape {tuple(weight.shape)}")
    hidden_size, weight_channels, patch, _ = weight.shape
    if weight_channels != channels:
        raise input_error(ValueError, op, "weight", f"have x's C={channels} input channels (weight.shape[1])",
                          weight_channels)
    if patch == 0 or height % patch or width % patch:
        raise input_error(ValueError, op, "x", f"have H and W divisible by the patch size p={patch}",
                          f"H={height}, W={width}")
    if bias.shape != (hidden_size,):
        raise input_error(ValueError, op, "bias", f"have shape ({hidden_size},) (D)", tuple(bias.shape))
    tokens = (height // patch) * (width // patch)
    if pos_embed.shape not in ((1, tokens, hidden_size), (tokens, hidden_size)):
        raise input_error(ValueError, op, "pos_embed", f"have shape (1, {tokens}, {hidden_size}) or "
                          f"({tokens}, {hidden_size}) (T = (H/p)*(W/p), D)", tuple(pos_embed.shape))


@torch.library.custom_op("fastdit::patch_embed", mutates_args=())
def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """DiT's patch embedding: (B, C, H, W) image -> (B, T, D) tokens with position embedding added.

    weight (D, C, p, p) and bias (D,) are the patchify Conv2d's; pos_embed is (1, T, D) or (T, D),
    T = (H/p)*(W/p) in row-major patch order. x and weight share one dtype, bias and pos_embed
    another (the same, or fp32 under autocast); the output has pos_embed's. Differentiable.
    """
    _validate(x, weight, bias, pos_embed)
    if use_triton(x):
        return _patch_embed_triton(x, weight, bias, pos_embed)
    return patch_embed_reference(x, weight, bias, pos_embed)


@patch_embed.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    patch = weight.shape[-1]
    tokens = (x.shape[2] // patch) * (x.shape[3] // patch)
    return x.new_empty((x.shape[0], tokens, weight.shape[0]), dtype=pos_embed.dtype)


@torch.library.custom_op("fastdit::patch_embed_backward", mutates_args=())
def patch_embed_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         pos_embed: torch.Tensor, output_mask: list[bool]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_pos_embed) of patch_embed for grad_out (B, T, D):
    new contiguous tensors with the shapes and dtypes of x, weight, bias and pos_embed. An entry
    whose output_mask is False is not computed and comes back empty, shape (0,)."""
    _validate(x, weight, bias, pos_embed)
    tokens, hidden_size = pos_embed.shape[-2:]
    if grad_out.shape != (x.shape[0], tokens, hidden_size) or grad_out.dtype != pos_embed.dtype:
        raise input_error(ValueError, "patch_embed_backward", "grad_out",
                          f"be {pos_embed.dtype} of shape {(x.shape[0], tokens, hidden_size)}",
                          f"{grad_out.dtype} {tuple(grad_out.shape)}")
    if len(output_mask) != 4:
        raise input_error(ValueError, "patch_embed_backward", "output_mask", "hold 4 flags", len(output_mask))
    inputs = x, weight, bias, pos_embed
    if use_triton(x) and grad_out.numel() > 0:
        grads = _patch_embed_backward_triton(grad_out.contiguous(), *inputs, output_mask)
    else:
        grads = patch_embed_backward_reference(grad_out, *inputs)
    return tuple(grad if needed else t.new_empty(0) for grad, t, needed in zip(grads, inputs, output_mask))


@patch_embed_backward.register_fake
def _(grad_out, x, weight, bias, pos_embed, output_mask):
    return tuple(t.new_empty(t.shape if needed else 0) for t, needed in zip((x, weight, bias, pos_embed), output_mask))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    needs = list(ctx.needs_input_grad)
    grads = patch_embed_backward(grad_out, *ctx.saved_tensors, needs)
    return tuple(grad if needed else None for grad, needed in zip(grads, needs))


patch_embed.register_autograd(_backward, setup_context=_setup_context)

"""Patch embedding: DiT's patchify conv, flatten to tokens and position embedding, fused.

The conv has kernel = stride = p, so it is a GEMM over non-overlapping patches:
``tokens (B*T, K) @ weight (K, D)`` with ``K = C*p*p``. The kernel gathers each patch
straight from the image in its A-operand load (no patchified copy of x), reads the conv
weight through its strides as the (K, D) B operand (no transpose copy), accumulates in
fp32 and adds bias and pos_embed in the epilogue before the single rounding to x's dtype.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import dot, to_storage
from .runtime import TRITON_INTERPRET, use_triton

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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

    # Row = (batch, token), token = hp * (W/p) + wp: the conv output flattened row-major.
    batch = offs_m // tokens
    token = offs_m % tokens
    patch_h = token // patches_per_row
    patch_w = token % patches_per_row
    # int64 so that large batches of large images cannot overflow the address arithmetic.
    row_offsets = (batch.to(tl.int64) * stride_xb
                   + (patch_h * PATCH).to(tl.int64) * stride_xh
                   + (patch_w * PATCH).to(tl.int64) * stride_xw)
    col_offsets_w = offs_n.to(tl.int64) * stride_wd

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        # Column k = c*p*p + i*p + j: the order of weight.view(D, C*p*p).
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_features
        channel = offs_k // (PATCH * PATCH)
        within = offs_k % (PATCH * PATCH)
        i = within // PATCH
        j = within % PATCH
        k_offsets_x = channel * stride_xc + i * stride_xh + j * stride_xw
        k_offsets_w = channel * stride_wc + i * stride_wi + j * stride_wj
        # Masked-off k columns load as zeros on both sides, so K pads up to tl.dot's minimum of 16.
        a = tl.load(x_ptr + row_offsets[:, None] + k_offsets_x[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(weight_ptr + k_offsets_w[:, None] + col_offsets_w[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, b, acc, INPUT_PRECISION)

    bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)
    # pos_embed is shared by every image of the batch: index it by token, not by row.
    pos = tl.load(pos_ptr + token[:, None].to(tl.int64) * stride_pos_t + offs_n[None, :] * stride_pos_d,
                  mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    acc += bias[None, :] + pos
    out_offsets = offs_m[:, None].to(tl.int64) * hidden_size + offs_n[None, :]
    tl.store(out_ptr + out_offsets, to_storage(acc, out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _block_sizes(in_features: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for a launch."""
    block_k = min(32, max(16, triton.next_power_of_2(in_features)))
    if TRITON_INTERPRET:
        # Small tiles keep the interpreter fast; BLOCK_K=32 still exercises the K loop and its tail.
        return 32, 64, block_k
    # K is tiny (16..256), so the op is mostly writing the (B*T, D) output. Picked by a sweep
    # on an H100 (DiT-XL/2 shapes): fp16/bf16 64x128 tiles, fp32 (ieee dot on FMA units) 128x64.
    if dtype == torch.float32:
        return 128, 64, block_k
    return 64, 128, block_k


def _patch_embed_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        pos_embed: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    hidden_size, _, patch, _ = weight.shape
    patches_per_row = width // patch
    tokens = (height // patch) * patches_per_row
    rows = batch * tokens
    in_features = channels * patch * patch
    out = torch.empty((batch, tokens, hidden_size), dtype=x.dtype, device=x.device)
    if rows == 0 or hidden_size == 0:
        return out
    pos = pos_embed[0] if pos_embed.dim() == 3 else pos_embed
    block_m, block_n, block_k = _block_sizes(in_features, x.dtype)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(hidden_size, block_n))
    _patch_embed_kernel[grid](
        x, weight, bias, pos, out,
        rows, tokens, patches_per_row, in_features, hidden_size,
        *x.stride(), *weight.stride(),
        bias.stride(0), pos.stride(0), pos.stride(1),
        PATCH=patch,
        # "ieee" keeps the fp32 path true fp32 (tf32 would cost ~1e-3 relative error).
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )
    return out


def patch_embed_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          pos_embed: torch.Tensor) -> torch.Tensor:
    """Conv2d(kernel = stride = p), flatten to (B, T, D), add pos_embed; fp32 math, one rounding."""
    patch = weight.shape[-1]
    tokens = F.conv2d(x.float(), weight.float(), bias.float(), stride=patch).flatten(2).transpose(1, 2)
    return (tokens + pos_embed.float()).to(x.dtype)


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"patch_embed: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"patch_embed: x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, tensor in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if tensor.dtype != x.dtype:
            raise TypeError(f"patch_embed: {name} must have x's dtype {x.dtype}, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"patch_embed: {name} must be on x's device {x.device}, got {tensor.device}")
    batch, channels, height, width = x.shape
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"patch_embed: weight must be (D, C, p, p) with a square kernel, got shape {tuple(weight.shape)}")
    hidden_size, weight_channels, patch, _ = weight.shape
    if weight_channels != channels:
        raise ValueError(f"patch_embed: weight has {weight_channels} input channels (weight.shape[1]) "
                         f"but x has C={channels}")
    if patch == 0 or height % patch or width % patch:
        raise ValueError(f"patch_embed: x's H={height} and W={width} must be divisible by the patch size p={patch}")
    if bias.shape != (hidden_size,):
        raise ValueError(f"patch_embed: bias must have shape ({hidden_size},) (D), got {tuple(bias.shape)}")
    tokens = (height // patch) * (width // patch)
    if pos_embed.shape not in ((1, tokens, hidden_size), (tokens, hidden_size)):
        raise ValueError(f"patch_embed: pos_embed must have shape (1, {tokens}, {hidden_size}) or "
                         f"({tokens}, {hidden_size}) (T = (H/p)*(W/p), D), got {tuple(pos_embed.shape)}")


@torch.library.custom_op("fastdit::patch_embed", mutates_args=())
def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """DiT's patch embedding: (B, C, H, W) image -> (B, T, D) tokens with position embedding added.

    weight (D, C, p, p) and bias (D,) are the patchify Conv2d's; pos_embed is (1, T, D) or (T, D),
    T = (H/p)*(W/p) in row-major patch order. All in one dtype; the output has it too.
    """
    _validate(x, weight, bias, pos_embed)
    if use_triton(x):
        return _patch_embed_triton(x, weight, bias, pos_embed)
    return patch_embed_reference(x, weight, bias, pos_embed)


@patch_embed.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    patch = weight.shape[-1]
    tokens = (x.shape[2] // patch) * (x.shape[3] // patch)
    return x.new_empty((x.shape[0], tokens, weight.shape[0]))

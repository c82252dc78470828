"""adaLN modulation of DiT: ``LayerNorm(x) * (1 + scale) + shift``, fused into one pass.

DiT normalises every token without affine parameters (eps 1e-6) and then modulates it with
per-sample ``shift``/``scale`` vectors (B, D) broadcast over the T tokens. In the model those
vectors are chunks of ``adaLN_modulation(c)`` (B, 6D), so they arrive as strided views: the
kernel takes their batch stride instead of copying them.

The per-row math lives in ``_layernorm_modulate`` so that the fused residual op in
``gated_residual.py`` reuses it, together with the launch and validation helpers below.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import to_storage
from .runtime import use_triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _layernorm_modulate(row, mask, shift, scale, D, eps):
    """Normalise one fp32 row held in registers (masked lanes zero) and modulate it."""
    mean = tl.sum(row, axis=0) / D
    # Two moments on the resident row, not E[x^2] - E[x]^2: rows with a large mean (the
    # residual stream drifts) would otherwise lose the variance to cancellation in fp32.
    centered = tl.where(mask, row - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / D
    return centered * tl.rsqrt(variance + eps) * (1.0 + scale) + shift


@triton.jit
def _modulate_layernorm_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    tokens, D,
    x_stride_batch, x_stride_token, shift_stride_batch, scale_stride_batch,
    eps,
    BLOCK_D: tl.constexpr,
):
    # int64 so that row * D cannot overflow on large batches of long sequences
    row = tl.program_id(0).to(tl.int64)
    batch = row // tokens
    token = row % tokens
    columns = tl.arange(0, BLOCK_D)
    mask = columns < D

    x = tl.load(x_ptr + batch * x_stride_batch + token * x_stride_token + columns, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + batch * shift_stride_batch + columns, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + batch * scale_stride_batch + columns, mask=mask, other=0.0)
    out = _layernorm_modulate(x.to(tl.float32), mask, shift.to(tl.float32), scale.to(tl.float32), D, eps)
    tl.store(out_ptr + row * D + columns, to_storage(out, out_ptr.dtype.element_ty), mask=mask)


def row_launch_config(hidden_size: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for kernels that hold one whole row of ``hidden_size`` in registers."""
    block_d = triton.next_power_of_2(hidden_size)
    # Past 1024 columns, 8 warps keep each thread's share of the row small enough not to spill.
    return block_d, 4 if block_d <= 1024 else 8


def unit_stride_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels step through the hidden dim with stride 1; any other layout is copied once."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _modulate_layernorm_triton(x, shift, scale, eps):
    x, shift, scale = unit_stride_rows(x), unit_stride_rows(shift), unit_stride_rows(scale)
    batch, tokens, hidden_size = x.shape
    out = torch.empty((batch, tokens, hidden_size), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d, num_warps = row_launch_config(hidden_size)
    _modulate_layernorm_kernel[(batch * tokens,)](
        x, shift, scale, out,
        tokens, hidden_size,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        eps,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def modulate_layernorm_reference(x, shift, scale, eps: float = 1e-6):
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def check_hidden_states(name: str, tensor: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Raise unless ``tensor`` is (batch, tokens, hidden_size) in a supported dtype (and matches ``like``)."""
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be 3-D (batch, tokens, hidden_size); got shape {tuple(tensor.shape)}")
    if like is None:
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16; got {tensor.dtype}")
        return
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(like.shape)}; got {tuple(tensor.shape)}")
    _check_dtype_and_device(name, tensor, like)


def check_per_sample(name: str, vector: torch.Tensor, x: torch.Tensor) -> None:
    """Raise unless ``vector`` is a (batch, hidden_size) modulation vector for ``x``."""
    expected = (x.shape[0], x.shape[2])
    if tuple(vector.shape) != expected:
        raise ValueError(
            f"{name} must have shape (batch, hidden_size) = {expected} to match x; got {tuple(vector.shape)}"
        )
    _check_dtype_and_device(name, vector, x)


def check_modulation(shift: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """Raise unless shift/scale modulate ``x`` and eps is a usable LayerNorm epsilon."""
    check_per_sample("shift", shift, x)
    check_per_sample("scale", scale, x)
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")


def _check_dtype_and_device(name, tensor, x):
    if tensor.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}); got {tensor.dtype}")
    if tensor.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}); got {tensor.device}")


@torch.library.custom_op("fastdit::modulate_layernorm", mutates_args=())
def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (no affine), x (B, T, D), shift/scale (B, D)."""
    check_hidden_states("x", x)
    check_modulation(shift, scale, x, eps)
    if use_triton(x):
        return _modulate_layernorm_triton(x, shift, scale, eps)
    return modulate_layernorm_reference(x, shift, scale, eps)


@modulate_layernorm.register_fake
def _(x, shift, scale, eps=1e-6):
    return x.new_empty(x.shape)

"""The (batch, tokens, heads, head_dim) tiles that attention's forward (attention.py) and
backward (attention_backward.py) kernels share, and the inputs they accept.

q, k, v and the gradients are read in place through their (batch, token, head) strides,
counted in VECTOR-element (16-byte) units: a stride like 72 or 216 elements is 16-byte
aligned, but only a multiple of 16 elements would let the compiler prove it, and unproven
16-bit rows gave wrong results on an H100 with Triton 3.6. Multiplying by the constexpr
VECTOR in the kernel proves it.

Head dims that are not a power of two (DiT-XL: 1152 / 16 = 72) are split into a
power-of-two part and a remainder padded to 16 (72 = 64 + 8 -> 16) rather than padded
to 128 whole: the dots run over 80 columns instead of 128.
"""
import math

import torch
import triton
import triton.language as tl

from .interpreter import to_storage
from .launch import check_same_device, check_supported_dtype, input_error, size_bucket

_MAX_HEAD_DIM = 256
LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))


@triton.jit
def head_base(ptr, batch, head, batch_vectors, head_vectors, VECTOR: tl.constexpr):
    return ptr + (batch * batch_vectors + head * head_vectors) * VECTOR


@triton.jit
def program_head(tokens, heads):
    """This program's (block, batch, head, row_base) on the grid (token blocks, batch * heads):
    its block of tokens, its batch and head (int64), and where its head's rows start in a
    (batch, heads, tokens) tensor such as lse."""
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    return tl.program_id(0), batch, head, batch_head.to(tl.int64) * tokens


@triton.jit
def program_qkv(
    q_ptr, k_ptr, v_ptr, o_ptr, tokens, heads,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    VECTOR: tl.constexpr,
):
    """``program_head``'s (block, batch, head, row_base), then the bases of its head in q, k, v
    and a fourth (batch, tokens, heads, head_dim) tensor o (the output, or its gradient)."""
    block, batch, head, row_base = program_head(tokens, heads)
    return (block, batch, head, row_base,
            head_base(q_ptr, batch, head, stride_qb, stride_qh, VECTOR),
            head_base(k_ptr, batch, head, stride_kb, stride_kh, VECTOR),
            head_base(v_ptr, batch, head, stride_vb, stride_vh, VECTOR),
            head_base(o_ptr, batch, head, stride_ob, stride_oh, VECTOR))


@triton.jit
def load_tile(base, rows, row_vectors, row_limit, cols, COL_LIMIT: tl.constexpr, VECTOR: tl.constexpr):
    mask = (rows[:, None] < row_limit) & (cols[None, :] < COL_LIMIT)
    return tl.load(base + rows[:, None] * row_vectors * VECTOR + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(base, rows, row_vectors, row_limit, cols, COL_LIMIT: tl.constexpr, VECTOR: tl.constexpr, tile):
    mask = (rows[:, None] < row_limit) & (cols[None, :] < COL_LIMIT)
    tl.store(base + rows[:, None] * row_vectors * VECTOR + cols[None, :], to_storage(tile, base.dtype.element_ty),
             mask=mask)


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(main, tail) column widths: main is the largest power of two <= head_dim (at least
    the 16 that tl.dot needs), tail covers the rest padded to a power of two >= 16, or 0."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def tile_shared_bytes(block_m: int, block_n: int, stages: int, head_dim: int, dtype: torch.dtype) -> int:
    """Shared memory that a program streaming (block_n, head_dim) tiles of two tensors over
    ``stages`` pipeline stages, against a resident (block_m, head_dim) tile, needs (the
    head dim as padded for the dots): the estimate that sizes tiles and stages to a GPU."""
    main, tail = split_head_dim(head_dim)
    return (block_m + 2 * stages * block_n) * (main + tail) * dtype.itemsize


def check_grid(op: str, batch: int, heads: int) -> None:
    """One program column per (batch, head): the CUDA grid's y dimension allows 65535."""
    if batch * heads > 65535:
        raise input_error(ValueError, op, "q", "have batch * heads at most 65535 (the CUDA grid's y limit)",
                          f"{batch} * {heads}")


def tuning_key(q: torch.Tensor) -> tuple:
    """The shape class of an attention launch: dtype, head dim and the bucket of the token count."""
    batch, tokens, heads, head_dim = q.shape
    return q.dtype, head_dim, size_bucket(tokens)


def vector_strides(*tensors: torch.Tensor) -> list[int]:
    """Each tensor's (batch, token, head) strides in its 16-byte vector units, as the kernels take them."""
    return [stride // (16 // t.element_size()) for t in tensors for stride in t.stride()[:3]]


def _is_vector_aligned(t: torch.Tensor) -> bool:
    """Unit stride along head_dim and 16-byte aligned base and (batch, token, head) strides
    (those of size-1 dims never move the pointer): what the kernel's vector loads need."""
    vector = 16 // t.element_size()
    strides_aligned = all(stride % vector == 0 or size == 1 for stride, size in zip(t.stride()[:3], t.shape[:3]))
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and strides_aligned


def as_vector_aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels' 16-byte loads can read it in place (qkv.unbind views,
    transposes, contiguous tensors), else a contiguous copy (head_dim not unit stride, or a
    view starting mid-vector)."""
    return t if _is_vector_aligned(t) else t.clone(memory_format=torch.contiguous_format)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise input_error(TypeError, op, name, "be a tensor", type(t).__name__)
    if q.dim() != 4:
        raise input_error(ValueError, op, "q", "have rank 4 (batch, tokens, heads, head_dim)",
                          f"shape {tuple(q.shape)}")
    check_supported_dtype(op, "q", q)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise input_error(ValueError, op, name, f"have q's shape {tuple(q.shape)}", tuple(t.shape))
        if t.dtype != q.dtype:
            raise input_error(TypeError, op, name, f"have q's dtype ({q.dtype})", t.dtype)
        check_same_device(op, name, t, "q", q)
    head_dim = q.shape[-1]
    if head_dim % 8 != 0 or head_dim > _MAX_HEAD_DIM:
        raise input_error(ValueError, op, "q", f"have a head_dim (last dim) that is a multiple of 8 and at most "
                          f"{_MAX_HEAD_DIM}", head_dim)
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise input_error(ValueError, op, "softmax_scale", "be a finite positive number", softmax_scale)

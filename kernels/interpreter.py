"""Arithmetic helpers that make interpreted kernels (``TRITON_INTERPRET=1``) compute what
compiled ones do. Triton's CPU interpreter (3.9) gets two bf16 operations wrong:

- ``tl.dot`` on bf16 operands multiplies their raw 16-bit patterns;
- casting fp32 to bf16 truncates, where compiled kernels round to nearest even; truncation
  biases every output toward zero and doubles the error of a deep model.

Compiled kernels take the plain operations (the branches fold away at compile time).
"""
import triton
import triton.language as tl

from .runtime import TRITON_INTERPRET

INTERPRETED: tl.constexpr = tl.constexpr(TRITON_INTERPRET)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` (``acc`` may be None) with fp32 accumulation."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            # fp32 operands holding the same bf16 values give the products a GPU's bf16 dot does.
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """Cast an fp32 block to ``dtype``, rounding to nearest even."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)

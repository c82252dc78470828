"""Arithmetic helpers that make interpreted kernels (``TRITON_INTERPRET=1``) compute what
compiled ones do. Triton's CPU interpreter (3.9) gets three operations wrong:

- ``tl.dot`` on bf16 operands multiplies their raw 16-bit patterns;
- casting fp32 to bf16 truncates, where compiled kernels round to nearest even; truncation
  biases every output toward zero and doubles the error of a deep model;
- casting fp32 to fp8e4nv (E4M3) rounds ties away from zero, and when the 3-bit mantissa rounds
  up past 0b111 it ORs the carry into the exponent instead of adding it: with an odd exponent the
  value drops a binade (127.99 is stored as 64, not 128), and nothing saturates at 448. Compiled
  kernels convert with ``cvt.rn.satfinite`` (round to nearest even, saturate at +-448). The
  interpreter converts values E4M3 holds exactly without error, so ``to_storage`` rounds in fp32 first.

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
    """Cast an fp32 block to ``dtype``, rounding to nearest even (and to fp8e4nv saturating at +-448)."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        if dtype == tl.float8e4nv:
            x = round_to_e4m3(x)
    return x.to(dtype)


@triton.jit
def round_to_e4m3(x):
    """fp32 values rounded to nearest even E4M3 values (still fp32), saturated at +-448."""
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    magnitude = tl.abs(x)
    # Normal E4M3 (from 2^-6) keeps 3 of fp32's 23 mantissa bits: round away the low 20, ties to even.
    bits = magnitude.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # Subnormal E4M3 is a multiple of 2^-9: adding 2^14 (whose fp32 ulp is 2^-9) rounds to one, ties to even.
    subnormal = (magnitude + 16384.0) - 16384.0
    rounded = tl.minimum(tl.where(magnitude < 0.015625, subnormal, normal), 448.0)
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)  # -0.0 stays -0.0

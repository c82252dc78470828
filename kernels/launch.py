"""What every launcher shares: the dtypes the ops take and the one style of their input errors,
the dots' input precision, the candidate launch configurations a launcher offers
``tuning.choose``, sized for the GPU, and Triton's floating-point fusion, set explicitly.

Input errors read ``<op>: <argument> must <what it must be>, got <what came>``; the ops check
their inputs at the boundary, and the kernels assume validated inputs.

A configuration is a dict of the kernel's constexpr block sizes plus ``num_warps`` and
``num_stages``; launchers pass it to the kernel as keyword arguments.

FP fusion (``enable_fp_fusion``): Triton 3.9 warns when it is left to TRITON_DEFAULT_FP_FUSION
and 3.10 changes its default, so every launch sets it. Contracting ``a * b + c`` into one FMA
rounds once instead of twice, so it changes the last bit of elementwise math; the interpreter
(which the tests run) never contracts. The dots are FMAs either way (their lowering emits them
explicitly: measured in the sm_90 SASS of the fp32 patch-embed dot, 512 FFMA with and without).
- LayerNorm, modulation and the gated residual (ROW_FP_FUSION off): compiled kernels then round
  as the interpreter and the torch reference do, and as the kernels are memory-bound the separate
  multiply and add cost no time.
- Patch embedding (off): it has no elementwise multiply-add outside its dots, so fusion would
  change nothing but the agreement with the interpreter.
- Attention (ATTENTION_FP_FUSION on): the softmax's exponent ``score * scale - row_max`` is one
  FMA per score, as in FlashAttention; separate, it adds an fp32 instruction per score to the
  part of the kernel that competes with the tensor cores. The difference is within one ulp of
  an fp32 exponent, far below the bf16/fp16 rounding of P and below the fp32 test tolerance.
"""
from typing import Any, Callable

import torch

from .runtime import TRITON_INTERPRET, gpu_spec

Config = dict[str, Any]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Under autocast the residual stream stays fp32 while the linears that feed the ops output these.
HALF_DTYPES = (torch.float16, torch.bfloat16)

ROW_FP_FUSION = False
PATCH_EMBED_FP_FUSION = False
ATTENTION_FP_FUSION = True


def input_error(error: type[Exception], op: str, argument: str, must: str, got: Any) -> Exception:
    """The error an op raises for a bad ``argument``: ``<op>: <argument> must <must>, got <got>``."""
    return error(f"{op}: {argument} must {must}, got {got}")


def check_supported_dtype(op: str, argument: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise input_error(TypeError, op, argument, "be float32, float16 or bfloat16", tensor.dtype)


def check_same_device(op: str, argument: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if tensor.device != like.device:
        raise input_error(ValueError, op, argument, f"be on {like_name}'s device ({like.device})", tensor.device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: "ieee" keeps fp32 true fp32 (tf32
    would cost ~1e-3 relative error); half operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def config(num_warps: int, num_stages: int = 1, **block_sizes: Any) -> Config:
    return {**block_sizes, "num_warps": num_warps, "num_stages": num_stages}


def offer(device: torch.device, candidates: list[Config], interpreted: Config | None = None,
          shared_bytes: Callable[[Config], int] | None = None) -> list[Config]:
    """The configurations a launch offers ``tuning.choose``, its default first.

    Interpreted: ``interpreted`` alone (or the first candidate), so results are deterministic.
    On a GPU: the candidates whose estimated shared memory (``shared_bytes``) fits the GPU's
    per-block limit, in order and without duplicates (clamping blocks to short sequences can
    make two equal); the first that fits becomes the default, so that a GPU with little shared
    memory (sm_86/89: 99 KiB) gets a default it can run without tuning.
    """
    if TRITON_INTERPRET:
        return [interpreted or candidates[0]]
    if shared_bytes is not None:
        limit = gpu_spec(device).shared_memory
        fitting = [candidate for candidate in candidates if shared_bytes(candidate) <= limit]
        # Nothing fits only on a GPU below every estimate: the smallest then fails with
        # Triton's out-of-resources error, which names the shared memory it needed.
        candidates = fitting or [min(candidates, key=shared_bytes)]
    unique = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def warpgroup_mma(device: torch.device) -> bool:
    """Whether dots compile to warpgroup-wide MMA (sm_90 and newer), whose accumulators one
    warpgroup of 4 warps shares; False interpreted."""
    return not TRITON_INTERPRET and gpu_spec(device).capability >= (9, 0)


def size_bucket(count: int) -> int:
    """The power of two at or above ``count``: launches whose sizes share a bucket share a tuning."""
    return 1 << max(0, count - 1).bit_length()

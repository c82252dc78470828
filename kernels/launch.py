"""What every launcher shares: the dtypes the ops take and the one style of their input errors,
the dots' input precision, the candidate launch configurations a launcher offers
``tuning.choose``, sized for the GPU (and their default, per Triton version where one spills:
``TRITON_3_6_DEFAULTS``), and Triton's floating-point fusion, set explicitly.

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
import triton

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


def triton_version(version: str) -> tuple[int, int]:
    """(major, minor) of a Triton version string such as "3.6.0" or "3.10.0+git1a2b3c4"."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


TRITON_VERSION = triton_version(triton.__version__)

# Per Triton version defaults. Each launcher lists its candidate tiles, its general default first.
# Triton 3.6 spills registers in the general default of three attention launches (attention.py,
# attention_backward.py) that 3.7 to 3.9 compile without spills (`python -m fastdit.tools.aot
# --defaults-only` under each release: docs/kernels.md, "Triton versions"). setup.py admits 3.6,
# the GPU machines' Triton (with torch 2.11), so under it each of these launches defaults to another
# of its own candidates, one that 3.6 compiles without spills at DiT's head dims (64 and 72) on
# sm_90 and sm_80; tuning still times the same candidates. Keyed by (tuning.choose's kernel name,
# dtypes); the value is the tile as the launcher lists it (the block a program owns, the block it
# loops over, warps, stages) and the GPUs it applies to: those whose dots are warpgroup MMAs ("sm_90
# on") or mma.sync ("before sm_90"; warpgroup_mma). Where a launch does not list the tile (the
# backward's head dims above 80), its general default stays. The registers and spills below are
# triton 3.6.0's, from `python -m fastdit.tools.aot` with `--defaults-only`, and with every candidate
# for `--dtype fp32 --image-size 256 --block in-context` and `--arch 80 --model DiT-XL/2 --dtype bf16
# fp16 --image-size 256 --block adaln-zero`.
TRITON_3_6_DEFAULTS = {
    # 32x32 over 4 warps with 2 stages reached 255 registers and spilled 8 B on sm_90 at head dim 64
    # (258 tokens); 64x32 over 8 warps spilled 8 B there at head dim 72. 3 stages spill at neither
    # (198-255 registers; 90-111 under 3.9). Not on sm_80, where 2 stages do not spill: 3 stages'
    # 55 KB of shared memory a block at head dim 72 (2 stages: 35 KB) fit 2 blocks in its 164 KB a
    # SM (1 KB reserved a block), where registers allow 4.
    ("attention_forward", "fp32"): ((32, 32, 4, 3), "sm_90 on"),
    # dK/dV with 64 keys over 4 warps reached 255 registers and spilled 8 B on sm_80 at head dim 72
    # (256 tokens), in fp16 and bf16. 128 keys over 8 warps (16 rows a warp either way, as mma.sync
    # takes them) does not (185-255 registers), but spills 8 B itself under 3.9: only 3.6 takes it.
    # dQ shares the configuration (128 queries over 8 warps: 128-176 registers). (The fp32 dK/dV
    # spill that 3.6 showed at 32/32 over 4 warps went with the fp32 backward's general default,
    # 64/32 over 8 warps: 80-186 registers under 3.6.)
    ("attention_backward", "half"): ((128, 32, 8, 2), "before sm_90"),
}


def version_tiles(tiles: list[tuple], launch: str, dtype: torch.dtype, device: torch.device) -> list[tuple]:
    """``tiles`` (a launch's candidates, its general default first) with the default that the
    installed Triton compiles without spills first: unchanged from Triton 3.7 on."""
    if TRITON_VERSION >= (3, 7):
        return tiles
    rule = TRITON_3_6_DEFAULTS.get((launch, "fp32" if dtype == torch.float32 else "half"))
    if rule is None:
        return tiles
    tile, gpus = rule
    if tile not in tiles or warpgroup_mma(device) != (gpus == "sm_90 on"):
        return tiles
    return [tile] + [other for other in tiles if other != tile]

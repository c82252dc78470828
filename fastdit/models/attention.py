"""Attention backends of the fast model, all on the (B, T, H, Dh) layout that a qkv
projection viewed as (B, T, 3, H, Dh) and unbound gives, so no backend needs a permute copy
of its inputs."""
import functools
import importlib

import torch
import torch.nn.functional as F

from fastdit.kernels.attention import attention as triton_attention
from fastdit.kernels.attention import attention_reference
from fastdit.kernels.runtime import kernel_path

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "flash_attn", "xformers", "math")

# Backends that live in another package: backend -> (module, pip name).
_PACKAGES = {"flash_attn": ("flash_attn", "flash-attn"), "xformers": ("xformers.ops", "xformers")}


def check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend: expected one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend in _PACKAGES:
        _import_backend(backend)
    return backend


@functools.cache
def _import_backend(backend: str):
    module, package = _PACKAGES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"attn_backend={backend!r} needs the package {package!r}, which is not importable ({error}); "
            f"install it (pip install {package}) or choose one of {', '.join(ATTENTION_BACKENDS)}"
        ) from None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The concrete backend ``"auto"`` stands for on this device, dtype and head size.

    On CUDA the Triton kernel takes half precision (it handles head dims that are not a
    power of two without padding to the next one); fp32 goes to SDPA, whose kernels use the
    GPU's fp32 path. Off the GPU, SDPA's CPU kernels are fastest (the Triton interpreter
    exists for testing, not speed).
    """
    if backend != "auto":
        return backend
    if device.type == "cuda" and kernel_path(device) == "triton" and dtype in (torch.float16, torch.bfloat16):
        return "triton"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over (B, T, H, Dh) tensors; returns (B, T, H, Dh)."""
    backend = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    if backend == "triton":
        return triton_attention(q, k, v)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        return attention_reference(q, k, v)
    if backend == "flash_attn":
        return _import_backend("flash_attn").flash_attn_func(q, k, v)
    if backend == "xformers":
        return _import_backend("xformers").memory_efficient_attention(q, k, v)
    raise ValueError(f"attn_backend: expected one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")

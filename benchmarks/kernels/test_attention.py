"""Attention at DiT's head sizes (64: DiT-S/B; 72: DiT-XL) over the qkv projection's output: the
reference model's attention, fastdit's flash-attention op, each PyTorch SDPA backend, and
flash-attn and xformers when they are installed."""
import importlib.util

import pytest
import torch.nn.functional as F
from fastdit.kernels.attention import attention, attention_reference
from harness import DTYPE, ON_GPU, check_outputs, group_name, random_inputs
from parity import KERNEL_TOLERANCE
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdit.bench.workloads import IMPLEMENTATIONS, dtype_name
from fastdit.models.attention import attention as attention_by_backend
from fastdit.models.flops import attention_macs

HEADS = [(16, 72), (12, 64)]  # (heads, head dim): DiT-XL, DiT-B
# (batch, tokens): 256, 1024 and 4096 tokens (DiT-*/2 at 256, 512 and 1024 px), as many tokens per
# batch each; a small batch on the CPU.
SIZES = [(32, 256), (8, 1024), (2, 4096)] if ON_GPU else [(1, 64), (1, 256)]
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
PACKAGES = {"flash-attn": ("flash_attn", "flash_attn"), "xformers": ("xformers", "xformers")}  # name: (module, backend)


def reference_attention(qkv):
    """The reference model's Attention between its qkv and proj linears."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def fastdit_attention(qkv):
    """fastdit's op reads q, k and v through strides straight out of the (B, T, 3, H, Dh) projection."""
    return attention(*qkv.unbind(2))


def sdpa(qkv, backend):
    with sdpa_kernel(backend):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def library_implementation(name, qkv):
    """An SDPA backend, or flash-attn / xformers through fastdit's attention backends; skip what is missing."""
    if name in SDPA_BACKENDS:
        return lambda: sdpa(qkv, SDPA_BACKENDS[name])
    module, backend = PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    return lambda: attention_by_backend(*qkv.unbind(2), backend)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + tuple(SDPA_BACKENDS) + tuple(PACKAGES))
@pytest.mark.parametrize("heads, head_dim", HEADS, ids=lambda value: str(value))
@pytest.mark.parametrize("batch, tokens", SIZES, ids=lambda value: str(value))
def test_attention(measure, benchmark_op, batch, tokens, heads, head_dim, implementation):
    (qkv,) = random_inputs((batch, tokens, 3, heads, head_dim))
    expected = attention_reference(*qkv.unbind(2))
    group = group_name("attention", f"B{batch} T{tokens} H{heads} Dh{head_dim}")
    flops = 2 * batch * attention_macs(tokens, heads * head_dim)
    elements_moved = 4 * batch * tokens * heads * head_dim  # q, k, v in, out
    if implementation in IMPLEMENTATIONS:
        benchmark_op(implementation, reference_attention, fastdit_attention, [qkv], expected, group, flops=flops,
                     elements_moved=elements_moved)
        return
    fn = library_implementation(implementation, qkv.to(DTYPE))
    try:
        out = fn()
    except RuntimeError as error:  # no kernel of this backend for this device, dtype or head size
        pytest.skip(f"{implementation}: {str(error).splitlines()[0]}")
    error = check_outputs(out, expected, KERNEL_TOLERANCE[DTYPE], implementation)
    measure(fn, group, flops=flops, bytes_moved=elements_moved * DTYPE.itemsize, dtype=dtype_name(DTYPE),
            max_error=error)

"""Which implementation of the fused ops runs on a given device.

The Triton kernels run natively on CUDA GPUs and, when ``TRITON_INTERPRET=1`` is set
before import, under Triton's CPU interpreter (how the tests exercise them without a
GPU). Anywhere else each op falls back to its torch function, which computes the same
math (fp32 accumulation, one rounding at the end).
"""
import os

import torch

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_PATHS = ("triton", "triton-interpreter", "torch")


def kernel_path(device: torch.device | str | None = None) -> str:
    """Name of the path the fused ops take for tensors on ``device``.

    ``"triton"`` (compiled kernels on a CUDA GPU), ``"triton-interpreter"`` (the same
    kernels interpreted on the CPU) or ``"torch"`` (plain torch math).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if TRITON_INTERPRET:
        return "triton-interpreter"
    if device.type == "cuda":
        return "triton"
    return "torch"


def use_triton(tensor: torch.Tensor) -> bool:
    return kernel_path(tensor.device) != "torch"

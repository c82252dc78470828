"""Fused Triton kernels of fastdit, installed as ``fastdit.kernels``."""
from .runtime import KERNEL_PATHS, TRITON_INTERPRET, kernel_path

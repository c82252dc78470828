"""fastdit: the latent Diffusion Transformer of Peebles & Xie (2023), on fused kernels.

``fastdit.DiT`` / ``fastdit.DiT_models`` are drop-in for the release's models (same
arguments, same state-dict keys); ``fastdit.reference`` is the plain PyTorch oracle.
"""
from fastdit import reference
from fastdit._version import __version__
from fastdit.diffusion.sampling import NonFiniteSampleError, sample
from fastdit.kernels import kernel_path
from fastdit.models.attention import ATTENTION_BACKENDS
from fastdit.models.checkpoint import NAMED_MODELS, save_pretrained
from fastdit.models.config import CheckpointError
from fastdit.models.dit import DiT, DiT_models, load

__all__ = [
    "ATTENTION_BACKENDS",
    "CheckpointError",
    "DiT",
    "DiT_models",
    "NAMED_MODELS",
    "NonFiniteSampleError",
    "kernel_path",
    "load",
    "reference",
    "sample",
    "save_pretrained",
]

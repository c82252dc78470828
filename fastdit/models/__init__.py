"""The fast DiT and what surrounds it: attention backends, its config and checkpoints, the VAE, input checks,
FLOP counts.

The plain-PyTorch oracle the fast model is checked against is ``fastdit.reference``.
"""
import torch

# The dtypes the models run in, by the short names that flags, reports and benchmarks use.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

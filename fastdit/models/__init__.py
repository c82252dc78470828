"""The fast DiT and what surrounds it: attention backends, checkpoints, input checks.

The plain-PyTorch oracle the fast model is checked against is ``fastdit.reference``.
"""

"""Patch embedding: the reference's patchify conv + flatten + position embedding against fastdit's
one GEMM with a fused epilogue."""
import pytest
import torch.nn.functional as F
from fastdit.kernels.patch_embed import patch_embed, patch_embed_reference
from harness import ON_GPU, group_name, random_inputs

from fastdit.bench.workloads import IMPLEMENTATIONS

# (batch, latent side, patch, hidden size): DiT-XL/2 at 256 and 512 px; a small one on the CPU.
SHAPES = [(32, 32, 2, 1152), (8, 64, 2, 1152)] if ON_GPU else [(2, 16, 2, 384)]
CHANNELS = 4  # the VAE's latent channels


def reference_patch_embed(x, weight, bias, pos_embed):
    """The reference's PatchEmbed followed by its ``+ self.pos_embed``."""
    return F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2) + pos_embed


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "B{}-{}x{}-p{}-D{}".format(shape[0], shape[1], *shape[1:]))
def test_patch_embed(benchmark_op, shape, implementation):
    batch, size, patch, hidden = shape
    tokens, features = (size // patch) ** 2, CHANNELS * patch * patch
    inputs = random_inputs((batch, CHANNELS, size, size), (hidden, CHANNELS, patch, patch), (hidden,),
                           (1, tokens, hidden))
    benchmark_op(implementation, reference_patch_embed, patch_embed, inputs, patch_embed_reference(*inputs),
                 group_name("patch_embed", f"B{batch} {size}x{size} p{patch} D{hidden}"),
                 flops=2 * batch * tokens * features * hidden,
                 elements_moved=batch * tokens * (features + hidden) + (hidden + tokens) * hidden + hidden)

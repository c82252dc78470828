"""The fast DiT: the paper's model on fused kernels.

Same constructor arguments, module names and state-dict keys as ``fastdit.reference`` (and
so as the release's checkpoints). The arithmetic is the reference's, regrouped so that each
step of the residual stream is one fused kernel:

- patchify + projection + position embedding is one GEMM with a fused epilogue;
- SiLU(c) is computed once: every adaLN modulation of every block reads the same c;
- ``x + gate * f(h)`` and the next LayerNorm + modulation are one pass over the residual
  stream, across block boundaries: block i's MLP residual update also produces block i+1's
  attention input (and the last block's, the final layer's input);
- attention reads q, k and v through strides straight out of the qkv projection.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastdit.attention import attention, check_backend
from fastdit.kernels.gated_residual import gated_residual_modulate_layernorm
from fastdit.kernels.modulate import modulate_layernorm
from fastdit.kernels.patch_embed import patch_embed
from fastdit import reference
from fastdit.reference import Mlp, model_constructors
from fastdit.validation import check_model_inputs


class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_backend="auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide hidden_size {dim}, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = check_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        return self.proj(attention(q, k, v, self.attn_backend).reshape(B, T, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block. Takes the residual stream ``x`` and its normalised, modulated copy
    ``h`` (made by the previous fused op) and returns both for the next block."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, silu_c):
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (N, D)."""
        return self.adaLN_modulation[1](silu_c).chunk(6, dim=1)

    def forward(self, x, h, modulation, next_shift, next_scale):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x, h = gated_residual_modulate_layernorm(x, gate_msa, self.attn(h), shift_mlp, scale_mlp)
        x, h = gated_residual_modulate_layernorm(x, gate_mlp, self.mlp(h), next_shift, next_scale)
        return x, h


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def modulation(self, silu_c):
        """(shift, scale), each (N, D)."""
        return self.adaLN_modulation[1](silu_c).chunk(2, dim=1)

    def forward(self, h):
        return self.linear(h)


class DiT(reference.DiT):
    """Diffusion model with a Transformer backbone, on fused kernels: the reference's constructor
    (so the same modules, parameters and initialisation), with a fused forward."""

    block_class = DiTBlock
    final_layer_class = FinalLayer

    def __init__(self, *args, attn_backend="auto", **kwargs):
        """The release's arguments (see ``fastdit.reference.DiT``), plus ``attn_backend``."""
        super().__init__(*args, **kwargs)
        self.set_attn_backend(attn_backend)
        self.gradient_checkpointing = False  # recompute each block's activations in backward

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A model in eval mode from a checkpoint file or directory: see ``fastdit.checkpoint.load``."""
        from fastdit import checkpoint  # checkpoint builds this class: imported at call time

        return checkpoint.load(path, **kwargs)

    def save_pretrained(self, directory):
        """Write ``config.json`` and ``model.safetensors`` to ``directory``: see ``fastdit.checkpoint``."""
        from fastdit import checkpoint

        checkpoint.save_pretrained(self, directory)

    @property
    def attn_backend(self):
        return self.blocks[0].attn.attn_backend if len(self.blocks) else "auto"

    def set_attn_backend(self, backend):
        check_backend(backend)
        for block in self.blocks:
            block.attn.attn_backend = backend
        return self

    def forward(self, x, t, y):
        """x: (N, C, H, W) latents (cast to the model's dtype), t: (N,) timesteps, y: (N,) labels."""
        check_model_inputs(self, x, t, y)
        proj = self.x_embedder.proj
        # Under autocast the GEMM runs in the autocast dtype and the residual stream stays in the
        # parameters' dtype (pos_embed's), as the reference's conv + pos_embed add does.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else proj.weight.dtype
        x = patch_embed(x.to(dtype), proj.weight.to(dtype), proj.bias, self.pos_embed)
        silu_c = F.silu(self.t_embedder(t) + self.y_embedder(y, self.training))
        modulations = [block.modulation(silu_c) for block in self.blocks]
        modulations.append(self.final_layer.modulation(silu_c))
        shift_msa, scale_msa = modulations[0][:2]
        h = modulate_layernorm(x, shift_msa, scale_msa)
        for block, modulation, next_modulation in zip(self.blocks, modulations, modulations[1:]):
            # Every modulation begins with (shift, scale) of its first LayerNorm.
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, h = checkpoint(block, x, h, modulation, *next_modulation[:2], use_reentrant=False)
            else:
                x, h = block(x, h, modulation, *next_modulation[:2])
        return self.unpatchify(self.final_layer(h))


DiT_models = model_constructors(DiT)

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

The paper's other block designs (``block="adaln"``, ``"cross-attn"``, ``"in-context"``) run on
the same chain: an ungated residual is a gate of ones, an affine LayerNorm a modulation by its
weight and bias broadcast over the batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastdit.models import checkpoint as checkpoints  # `checkpoint` is torch's activation checkpointing
from fastdit.models.attention import attention, check_backend
from fastdit.kernels.gated_residual import gated_residual_modulate_layernorm
from fastdit.kernels.modulate import modulate_layernorm
from fastdit.kernels.patch_embed import patch_embed
from fastdit import reference
from fastdit.reference import ADAPTIVE_DESIGNS, CONDITION_TOKENS, Mlp, model_constructors
from fastdit.models.validation import check_model_inputs


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


class CrossAttention(reference.CrossAttention):
    """The reference's cross-attention on SDPA: its keys are the two conditioning tokens, too few
    for the flash kernel's tiles to pay."""

    def forward(self, x, context):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.num_heads, self.head_dim)
        k, v = self.kv(context).view(B, -1, 2, self.num_heads, self.head_dim).unbind(2)
        return self.proj(attention(q, k, v, "sdpa").reshape(B, T, D))


# Each block lists its residual branches in order as (shift, scale, gate, branch): the branch's
# input is LayerNorm(x) * (1 + scale) + shift, its output is added to x times gate (None: ungated).
# The model runs them as one chain of fused residual + next-norm kernels.


def affine_norm_modulation(norm, batch, dtype):
    """An affine LayerNorm's weight and bias as the (shift, scale) the fused kernels take,
    broadcast over the batch (stride 0: nothing is copied)."""
    shift = norm.bias.to(dtype).expand(batch, -1)
    scale = (norm.weight - 1).to(dtype).expand(batch, -1)
    return shift, scale


class FusedBlock(nn.Module):
    def forward(self, x, h, branches, next_shift, next_scale):
        """Run the block's branches on the residual stream ``x`` and its normalised, modulated
        copy ``h`` (made by the previous fused op); return both for the next block, ``h`` made
        with (next_shift, next_scale)."""
        norms = [branch[:2] for branch in branches[1:]] + [(next_shift, next_scale)]
        for (_, _, gate, branch), (shift, scale) in zip(branches, norms):
            y = branch(h)
            if gate is None:
                gate = torch.ones((y.shape[0], y.shape[2]), dtype=y.dtype, device=y.device)
            x, h = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
        return x, h


class DiTBlock(FusedBlock):
    """adaLN-Zero."""

    modulations = 6

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, self.modulations * hidden_size, bias=True)
        )

    def branches(self, silu_c, dtype):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation[1](silu_c).chunk(6, 1)
        return [(shift_msa, scale_msa, gate_msa, self.attn), (shift_mlp, scale_mlp, gate_mlp, self.mlp)]


class AdaLNBlock(DiTBlock):
    """adaLN: ungated."""

    modulations = 4

    def branches(self, silu_c, dtype):
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation[1](silu_c).chunk(4, dim=1)
        return [(shift_msa, scale_msa, None, self.attn), (shift_mlp, scale_mlp, None, self.mlp)]


class CrossAttentionBlock(FusedBlock):
    """Cross-attention to the tokens [t, y] after the self-attention; affine LayerNorms."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def branches(self, tokens, dtype):
        batch = tokens.shape[0]
        return [
            (*affine_norm_modulation(self.norm1, batch, dtype), None, self.attn),
            (*affine_norm_modulation(self.norm2, batch, dtype), None, lambda h: self.cross_attn(h, tokens)),
            (*affine_norm_modulation(self.norm3, batch, dtype), None, self.mlp),
        ]


class InContextBlock(FusedBlock):
    """A standard ViT block (affine LayerNorms); the conditioning tokens are in the sequence."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def branches(self, tokens, dtype):
        batch = tokens.shape[0]
        return [
            (*affine_norm_modulation(self.norm1, batch, dtype), None, self.attn),
            (*affine_norm_modulation(self.norm2, batch, dtype), None, self.mlp),
        ]


class FinalLayer(nn.Module):
    """Adaptive final norm (made by the last fused op) and the linear decoder."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def modulation(self, silu_c, dtype):
        """(shift, scale), each (N, D)."""
        return self.adaLN_modulation[1](silu_c).chunk(2, dim=1)

    def forward(self, h):
        return self.linear(h)


class LayerNormFinalLayer(nn.Module):
    """Affine final norm (made by the last fused op) and the linear decoder."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def modulation(self, tokens, dtype):
        return affine_norm_modulation(self.norm_final, tokens.shape[0], dtype)

    def forward(self, h):
        return self.linear(h)


class DiT(reference.DiT):
    """Diffusion model with a Transformer backbone, on fused kernels: the reference's constructor
    (so the same modules, parameters and initialisation), with a fused forward."""

    block_classes = {
        "adaln-zero": DiTBlock, "adaln": AdaLNBlock, "cross-attn": CrossAttentionBlock, "in-context": InContextBlock,
    }
    final_layer_classes = {
        "adaln-zero": FinalLayer, "adaln": FinalLayer, "cross-attn": LayerNormFinalLayer,
        "in-context": LayerNormFinalLayer,
    }

    def __init__(self, *args, attn_backend="auto", **kwargs):
        """The release's arguments (see ``fastdit.reference.DiT``), plus ``attn_backend``."""
        super().__init__(*args, **kwargs)
        self.set_attn_backend(attn_backend)
        self.gradient_checkpointing = False  # recompute each block's activations in backward

    @classmethod
    def from_pretrained(cls, path, *, config=None, device="cpu", dtype=None, attn_backend="auto"):
        """A model in eval mode from a checkpoint file or directory: see ``fastdit.models.checkpoint.build``."""
        return checkpoints.build(cls, path, config=config, device=device, dtype=dtype, attn_backend=attn_backend)

    def save_pretrained(self, directory):
        """Write ``config.json`` and ``model.safetensors`` to ``directory``: see ``fastdit.models.checkpoint``."""
        checkpoints.save_pretrained(self, directory)

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
        c = self.condition(t, y)
        if self.block in ADAPTIVE_DESIGNS:
            c = F.silu(c)  # once: every adaLN modulation of every block starts with SiLU(c)
        else:
            c = c.to(x.dtype)  # the tokens [t, y] join (or are attended from) the residual stream
        if self.block == "in-context":
            x = torch.cat([c, x], dim=1)
        branches = [block.branches(c, dtype) for block in self.blocks]
        # (shift, scale) of each block's first norm, then the final layer's.
        norms = [block_branches[0][:2] for block_branches in branches] + [self.final_layer.modulation(c, dtype)]
        h = modulate_layernorm(x, *norms[0])
        for block, block_branches, (next_shift, next_scale) in zip(self.blocks, branches, norms[1:]):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, h = checkpoint(block, x, h, block_branches, next_shift, next_scale, use_reentrant=False)
            else:
                x, h = block(x, h, block_branches, next_shift, next_scale)
        if self.block == "in-context":
            h = h[:, CONDITION_TOKENS:]
        return self.unpatchify(self.final_layer(h))


DiT_models = model_constructors(DiT)
load = DiT.from_pretrained  # fastdit.load

"""The fast DiT: the paper's model on fused kernels.

Same constructor arguments, module names and state-dict keys as ``fastdit.reference`` (and
so as the release's checkpoints). The arithmetic is the reference's, regrouped so that each
step of the residual stream is one fused kernel:

- patchify + projection + position embedding is one GEMM with a fused epilogue;
- SiLU(c) is computed once and every adaLN modulation of every block (and of the final layer)
  comes out of one GEMM against their weights stacked (``fastdit.models.modulation``);
- ``x + gate * f(h)`` and the next LayerNorm + modulation are one pass over the residual
  stream (``gated_residual_modulate_layernorm``), across block boundaries: block i's MLP
  residual update also produces block i+1's attention input (and the last block's, the final
  layer's input). So the model computes every modulation up front, and each block's forward
  takes the next block's first (shift, scale);
- attention reads q, k and v through strides straight out of the qkv projection.

Quantized to FP8 (``quantize("fp8")``, ``fastdit.models.fp8``), the same fused ops write the blocks'
GEMM inputs in E4M3 with per-token scales (``QuantizedActivation``s): the first block's h, and each
h whose consumer is an ``FP8Linear`` (fc1's, the next block's qkv); the final layer's stays bf16.

Each block's forward is the paper's residual lines with the fused op in their place. The other
block designs (``block="adaln"``, ``"cross-attn"``, ``"in-context"``) call it with ``gate=None``
(their residual is ungated) and take an affine LayerNorm as a modulation by its weight and bias.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastdit.models import checkpoint as checkpoints  # `checkpoint` is torch's activation checkpointing
from fastdit.models import fp8
from fastdit.models.attention import attention, check_backend
from fastdit.models.modulation import modulations as adaln_modulations, stack_modulations
from fastdit.kernels.gated_residual import gated_residual_modulate_layernorm, gated_residual_modulate_layernorm_fp8
from fastdit.kernels.gelu_fp8 import gelu_fp8
from fastdit.kernels import linear_gelu as fused_gelu
from fastdit.kernels.modulate import modulate_layernorm, modulate_layernorm_fp8
from fastdit.kernels.patch_embed import patch_embed
from fastdit import reference
from fastdit.reference import ADAPTIVE_DESIGNS, CONDITION_TOKENS, model_constructors
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
        qkv = self.qkv(x)  # x: (B, T, D), or its QuantizedActivation when qkv is an FP8Linear
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        return self.proj(attention(q, k, v, self.attn_backend).reshape(B, T, -1))


class CrossAttention(reference.CrossAttention):
    """The reference's cross-attention on SDPA: its keys are the two conditioning tokens, too few
    for the flash kernel's tiles to pay."""

    def forward(self, x, context):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.num_heads, self.head_dim)
        k, v = self.kv(context).view(B, -1, 2, self.num_heads, self.head_dim).unbind(2)
        return self.proj(attention(q, k, v, "sdpa").reshape(B, T, D))


def linear_dtype(parameter):
    """The dtype the linears compute in: autocast's where it is on for the parameter's device, else
    the parameter's. The fused ops take the branches' outputs and modulations in this dtype."""
    device = parameter.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else parameter.dtype


class Mlp(reference.Mlp):
    """fc1 + bias + GELU as one GEMM with the GELU in its epilogue (``fastdit.kernels.linear_gelu``), then fc2.

    Where autograd records the MLP (training), it runs as the reference's three ops instead: the
    fused op's backward would recompute fc1's output, one GEMM more than the GELU pass it saves
    (docs/performance.md), to save a (tokens, 4D) activation per block.

    Quantized (fc1 and fc2 ``FP8Linear``s), x is a ``QuantizedActivation`` and the GELU is one pass that
    also quantizes fc2's input (``gelu_fp8``): an FP8 GEMM has no GELU epilogue."""

    def forward(self, x):
        fc1 = self.fc1
        if isinstance(fc1, fp8.FP8Linear):
            return self.fc2(fp8.QuantizedActivation(*gelu_fp8(fc1(x))))
        recorded = torch.is_grad_enabled() and (x.requires_grad or fc1.weight.requires_grad)
        if not fused_gelu.FUSED or recorded:
            return super().forward(x)
        dtype = linear_dtype(fc1.weight)  # autocast does not cast a custom op's inputs
        return self.fc2(fused_gelu.linear_gelu(x.to(dtype), fc1.weight.to(dtype), fc1.bias.to(dtype)))


def affine_norm_modulation(norm, batch):
    """An affine LayerNorm's weight and bias as the (shift, scale) the fused kernels take,
    broadcast over the batch (stride 0: nothing is copied)."""
    dtype = linear_dtype(norm.weight)
    shift = norm.bias.to(dtype).expand(batch, -1)
    scale = (norm.weight - 1).to(dtype).expand(batch, -1)
    return shift, scale


def residual_norm(x, gate, y, shift, scale, quantize):
    """``gated_residual_modulate_layernorm``: the new x and its normed copy h, which with ``quantize`` (h feeds
    an FP8Linear) comes quantized in the same pass, as a QuantizedActivation."""
    if quantize:
        x, values, scales = gated_residual_modulate_layernorm_fp8(x, gate, y, shift, scale)
        return x, fp8.QuantizedActivation(values, scales)
    return gated_residual_modulate_layernorm(x, gate, y, shift, scale)


def quantized_mlp(block):
    return isinstance(block.mlp.fc1, fp8.FP8Linear)


# Every block's forward takes the residual stream x, h = its first norm's modulated LayerNorm of x
# (made by the fused op that ended the previous block), its modulation (from ``modulation(c)``) and
# the (shift, scale) of the next norm after it; it returns the new x and that next h, quantized when
# ``quantize_next`` (the next block of an FP8 model; see ``residual_norm``).


class DiTBlock(nn.Module):
    """adaLN-Zero."""

    modulations = 6

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, self.modulations * hidden_size, bias=True)
        )

    def forward(self, x, h, modulation, next_shift, next_scale, quantize_next=False):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x, h = residual_norm(x, gate_msa, self.attn(h), shift_mlp, scale_mlp, quantized_mlp(self))
        x, h = residual_norm(x, gate_mlp, self.mlp(h), next_shift, next_scale, quantize_next)
        return x, h


class AdaLNBlock(DiTBlock):
    """adaLN: ungated."""

    modulations = 4

    def forward(self, x, h, modulation, next_shift, next_scale, quantize_next=False):
        _, _, shift_mlp, scale_mlp = modulation
        x, h = residual_norm(x, None, self.attn(h), shift_mlp, scale_mlp, quantized_mlp(self))
        x, h = residual_norm(x, None, self.mlp(h), next_shift, next_scale, quantize_next)
        return x, h


class CrossAttentionBlock(nn.Module):
    """Cross-attention to the tokens [t, y] after the self-attention; affine LayerNorms, ungated."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def modulation(self, tokens):
        """(shift1, scale1, shift2, scale2, shift3, scale3) of norm1-3, and the tokens to attend to."""
        batch = tokens.shape[0]
        norms = (self.norm1, self.norm2, self.norm3)
        return *(value for norm in norms for value in affine_norm_modulation(norm, batch)), tokens

    def forward(self, x, h, modulation, next_shift, next_scale, quantize_next=False):
        _, _, shift2, scale2, shift3, scale3, tokens = modulation
        # cross-attention's q is a bf16 linear: its input stays bf16
        x, h = residual_norm(x, None, self.attn(h), shift2, scale2, False)
        x, h = residual_norm(x, None, self.cross_attn(h, tokens), shift3, scale3, quantized_mlp(self))
        x, h = residual_norm(x, None, self.mlp(h), next_shift, next_scale, quantize_next)
        return x, h


class InContextBlock(nn.Module):
    """A standard ViT block (affine LayerNorms, ungated); the conditioning tokens are in the sequence."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def modulation(self, tokens):
        """(shift1, scale1, shift2, scale2) of norm1 and norm2."""
        batch = tokens.shape[0]
        return *affine_norm_modulation(self.norm1, batch), *affine_norm_modulation(self.norm2, batch)

    def forward(self, x, h, modulation, next_shift, next_scale, quantize_next=False):
        _, _, shift2, scale2 = modulation
        x, h = residual_norm(x, None, self.attn(h), shift2, scale2, quantized_mlp(self))
        x, h = residual_norm(x, None, self.mlp(h), next_shift, next_scale, quantize_next)
        return x, h


class FinalLayer(nn.Module):
    """Adaptive final norm (made by the last fused op) and the linear decoder."""

    modulations = 2  # (shift, scale)

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, h):
        return self.linear(h)


class LayerNormFinalLayer(nn.Module):
    """Affine final norm (made by the last fused op) and the linear decoder."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def modulation(self, tokens):
        return affine_norm_modulation(self.norm_final, tokens.shape[0])

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

    quantization = None  # "fp8" once ``quantize("fp8")`` has run

    def __init__(self, *args, attn_backend="auto", **kwargs):
        """The release's arguments (see ``fastdit.reference.DiT``), plus ``attn_backend``."""
        super().__init__(*args, **kwargs)
        if self.block in ADAPTIVE_DESIGNS:
            stack_modulations(self, [*self.blocks, self.final_layer])
        self.set_attn_backend(attn_backend)
        self.gradient_checkpointing = False  # recompute each block's activations in backward

    @classmethod
    def from_pretrained(cls, path, *, config=None, device="cpu", dtype=None, weights=None, allow_nonfinite=False,
                        attn_backend="auto", quantize=None):
        """A model in eval mode from a checkpoint file or directory; ``weights``: a training checkpoint's
        "ema" (the default) or "model". See ``fastdit.models.checkpoint.build``. ``quantize="fp8"``: the
        blocks' GEMMs in FP8 (``quantize``), the rest in bf16 (``dtype`` None or bfloat16)."""
        fp8.check_quantize(quantize)
        if quantize is not None:
            if dtype not in (None, torch.bfloat16):
                raise ValueError(f"dtype: quantize={quantize!r} runs the model in torch.bfloat16, got {dtype}")
            dtype = torch.bfloat16
        model = checkpoints.build(cls, path, config=config, device=device, dtype=dtype, weights=weights,
                                  allow_nonfinite=allow_nonfinite, attn_backend=attn_backend)
        return model if quantize is None else model.quantize(quantize)

    def quantize(self, quantize):
        """Quantize the blocks' qkv, attention projection, fc1 and fc2 for inference: ``"fp8"`` (E4M3 weights
        with a scale per output channel, inputs with a scale per token; see ``fastdit.models.fp8``). The model
        must be bf16, on the CPU or a CUDA GPU of compute capability 8.9 or newer; it is then eval-only."""
        fp8.quantize_(self, quantize)
        return self

    def train(self, mode=True):
        if mode and self.quantization is not None:
            raise ValueError(f"train: the model is quantized to {self.quantization}, for inference only; load the "
                             "checkpoint again without quantize to train it")
        return super().train(mode)

    def save_pretrained(self, directory, format="fastdit"):
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (``format="diffusers"``: a diffusers
        DiTTransformer2DModel folder): see ``fastdit.models.checkpoint.save_pretrained``."""
        checkpoints.save_pretrained(self, directory, format)

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
        x, h, modulations = self.embed(x, t, y)
        x, h = self.run_blocks(x, h, modulations, 0, len(self.blocks))
        return self.final_output(h)

    # The forward in three parts, so that a feature cache (``fastdit.diffusion.caching``) can run the
    # first block, all blocks or none of them, and reuse or forecast what the others add to x.

    def embed(self, x, t, y):
        """The residual stream x (N, T, D) that enters the blocks, the first block's input h (its first
        norm's modulated LayerNorm of x) and every modulation: the blocks', then the final layer's."""
        check_model_inputs(self, x, t, y)
        proj = self.x_embedder.proj
        # Under autocast the GEMM runs in the autocast dtype and the residual stream stays in the
        # parameters' dtype (pos_embed's), as the reference's conv + pos_embed add does.
        dtype = linear_dtype(proj.weight)
        x = patch_embed(x.to(dtype), proj.weight.to(dtype), proj.bias, self.pos_embed)
        c = self.condition(t, y)
        if self.block in ADAPTIVE_DESIGNS:
            c = F.silu(c)  # once: every adaLN modulation of every block starts with SiLU(c)
        else:
            c = c.to(x.dtype)  # the tokens [t, y] join (or are attended from) the residual stream
        if self.block == "in-context":
            x = torch.cat([c, x], dim=1)
        # Each modulation starts with the (shift, scale) of its block's first norm (the final layer's
        # last), which the block before it applies in its last fused op.
        layers = [*self.blocks, self.final_layer]
        if self.block in ADAPTIVE_DESIGNS:  # (shift_msa, scale_msa, gate_msa, shift_mlp, ...), each (N, D)
            modulations = [output.chunk(layer.modulations, dim=1)
                           for layer, output in zip(layers, adaln_modulations(self, layers, c))]
        else:
            modulations = [layer.modulation(c) for layer in layers]
        return x, self.normed_input(x, modulations, 0), modulations

    def quantized_input(self, index):
        """Whether block ``index``'s input h is quantized: in an FP8 model, every block's (its qkv is an
        FP8Linear); never the final layer's (index = depth)."""
        return self.quantization is not None and index < len(self.blocks)

    def normed_input(self, x, modulations, index):
        """Block ``index``'s input h for the residual stream x (index = depth: the final layer's)."""
        if self.quantized_input(index):
            return fp8.QuantizedActivation(*modulate_layernorm_fp8(x, *modulations[index][:2]))
        return modulate_layernorm(x, *modulations[index][:2])

    def run_blocks(self, x, h, modulations, start, stop):
        """Blocks start..stop - 1 on (x, h): the new x and block ``stop``'s input h."""
        for index in range(start, stop):
            block, modulation = self.blocks[index], modulations[index]
            next_shift, next_scale = modulations[index + 1][:2]
            quantize_next = self.quantized_input(index + 1)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, h = checkpoint(block, x, h, modulation, next_shift, next_scale, quantize_next, use_reentrant=False)
            else:
                x, h = block(x, h, modulation, next_shift, next_scale, quantize_next)
        return x, h

    def final_output(self, h):
        """The final layer's input h -> the model's output (N, C or 2C, H, W)."""
        if self.block == "in-context":
            h = h[:, CONDITION_TOKENS:]
        return self.unpatchify(self.final_layer(h))

DiT_models = model_constructors(DiT)
load = DiT.from_pretrained  # fastdit.load

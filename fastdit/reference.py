"""The reference DiT: plain PyTorch, the oracle every fast path is checked against.

Written from Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023), and the
architecture facts of its release, so that a released checkpoint (e.g. DiT-XL-2-256x256.pt)
loads with ``load_state_dict(strict=True)`` and gives the release's outputs: the same
constructor arguments, module names, parameter shapes, initialisation and arithmetic order.
"""
import math
import numbers
import re

import numpy as np
import torch
import torch.nn as nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --- embedders ------------------------------------------------------------------------------


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)],
    f_i = max_period^(-i / half) for i < half = dim // 2, zero-padded to an odd dim."""
    half = dim // 2
    # Built on t's device (not copied there), so a CUDA graph can capture it.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Timestep t -> 256-wide sinusoidal features -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> embedding. With class dropout (for classifier-free guidance) the table
    has one extra row, index ``num_classes``, for the null class."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Patchify: a conv with kernel = stride = patch, flattened to (N, T, D) in row-major order."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# --- transformer --------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (qkv bias on)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to a short context sequence
    (keys and values): the cross-attention block's conditioning on [t, y]."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, T, D = x.shape
        q = self.q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


# --- the paper's four block designs (Section 3.2, Figure 3) ---------------------------------


class DiTBlock(nn.Module):
    """adaLN-Zero: LayerNorm's shift and scale, and a gate before each residual add, regressed
    from c = t + y; the gates start at zero, so each block starts as the identity."""

    modulations = 6  # (shift, scale, gate) for the attention and for the MLP

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, self.modulations * hidden_size, bias=True)
        )

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class AdaLNBlock(DiTBlock):
    """adaLN: LayerNorm's shift and scale regressed from c = t + y; residuals add ungated."""

    modulations = 4  # (shift, scale) for the attention and for the MLP

    def forward(self, x, c):
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class CrossAttentionBlock(nn.Module):
    """Cross-attention: a ViT block with a multi-head cross-attention layer to the length-two
    sequence [t, y] after the self-attention (standard, affine LayerNorms)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), c)
        x = x + self.mlp(self.norm3(x))
        return x


class InContextBlock(nn.Module):
    """In-context conditioning: a standard ViT block; t and y ride in the sequence as two extra
    tokens, so the block itself ignores c."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class FinalLayer(nn.Module):
    """Adaptive final LayerNorm (the adaLN designs) and the linear decoder to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LayerNormFinalLayer(nn.Module):
    """Standard (affine) final LayerNorm and the linear decoder: the token-conditioned designs."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x, c):
        return self.linear(self.norm_final(x))


BLOCK_DESIGNS = ("adaln-zero", "adaln", "cross-attn", "in-context")
# Designs that condition through adaptive LayerNorm on c = t + y; the others see [t, y] as tokens.
ADAPTIVE_DESIGNS = ("adaln-zero", "adaln")
# How many conditioning tokens the token designs carry: the timestep and the class.
CONDITION_TOKENS = 2


def check_block_design(block):
    if block not in BLOCK_DESIGNS:
        raise ValueError(f"block: expected one of {', '.join(map(repr, BLOCK_DESIGNS))}, got {block!r}")
    return block


def check_dit_arguments(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                        class_dropout_prob, num_classes):
    """DiT's constructor arguments, each named with what was expected and what came, before any module
    is built (a bad one would otherwise fail deep in a layer, or build a model that fails on first use)."""
    for name, value, low in (("input_size", input_size, 1), ("patch_size", patch_size, 1),
                             ("in_channels", in_channels, 1), ("hidden_size", hidden_size, 1),
                             ("depth", depth, 0), ("num_heads", num_heads, 1), ("num_classes", num_classes, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if input_size % patch_size:
        raise ValueError(f"patch_size: expected a divisor of input_size {input_size}, got {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"num_heads: expected a divisor of hidden_size {hidden_size}, got {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size: expected a multiple of 4 (the 2-D sin-cos position embedding), "
                         f"got {hidden_size}")
    if not (isinstance(mlp_ratio, numbers.Real) and math.isfinite(mlp_ratio) and int(hidden_size * mlp_ratio) >= 1):
        raise ValueError(f"mlp_ratio: expected a finite number > 0 that leaves the MLP at least one unit "
                         f"(int(hidden_size * mlp_ratio) >= 1), got {mlp_ratio!r}")
    # 1 would drop every label in training: the model would never see a class.
    if not (isinstance(class_dropout_prob, numbers.Real) and 0 <= class_dropout_prob < 1):
        raise ValueError(f"class_dropout_prob: expected a probability in [0, 1), got {class_dropout_prob!r}")


# --- the model ------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""

    # Block and final layer of each design; the fast model (fastdit.models.dit) builds the same
    # modules from its fused ones.
    block_classes = {
        "adaln-zero": DiTBlock, "adaln": AdaLNBlock, "cross-attn": CrossAttentionBlock, "in-context": InContextBlock,
    }
    final_layer_classes = {
        "adaln-zero": FinalLayer, "adaln": FinalLayer, "cross-attn": LayerNormFinalLayer,
        "in-context": LayerNormFinalLayer,
    }

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        block="adaln-zero",
    ):
        """The release's arguments, plus ``block``: the paper's block design, one of
        ``BLOCK_DESIGNS`` (the release and its checkpoints are "adaln-zero")."""
        super().__init__()
        self.block = check_block_design(block)
        check_dit_arguments(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                            class_dropout_prob, num_classes)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, kept as a frozen parameter so it is in the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        block_class = self.block_classes[block]
        self.blocks = nn.ModuleList([block_class(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = self.final_layer_classes[block](hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        initialize_dit_weights(self)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def condition(self, t, y):
        """The design's conditioning: the vector c = t + y for the adaLN designs, else the
        length-two sequence [t, y] (N, 2, D)."""
        t, y = self.t_embedder(t), self.y_embedder(y, self.training)
        return t + y if self.block in ADAPTIVE_DESIGNS else torch.stack([t, y], dim=1)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.condition(t, y)
        if self.block == "in-context":
            x = torch.cat([c, x], dim=1)
        for block in self.blocks:
            x = block(x, c)
        if self.block == "in-context":
            x = x[:, CONDITION_TOKENS:]  # decode only the image tokens
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance: the batch is [cond; uncond] over the same latents."""
        half = x[: len(x) // 2]
        return classifier_free_guidance(self.forward(torch.cat([half, half], dim=0), t, y), cfg_scale)


def classifier_free_guidance(model_out, cfg_scale, channels=3):
    """Guide a [cond; uncond] model output: eps = uncond + s (cond - uncond), returned for both
    halves. The release guides only the first 3 channels (for exact reproducibility of its
    results); ``channels=None`` guides all of them."""
    channels = model_out.shape[1] if channels is None else channels
    eps, rest = model_out[:, :channels], model_out[:, channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def initialize_dit_weights(model):
    """The release's initialisation: xavier-uniform linears with zero bias, the patch conv as a
    linear, N(0, 0.02) label table and timestep MLP, sin-cos positions, and zeros in every adaLN
    modulation and the final projection. With adaLN-Zero each block so starts as the identity;
    with adaLN each norm starts as a plain LayerNorm (zero shift and scale), ungated. Affine
    LayerNorms (the token designs) start at weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    grid_size = int(model.x_embedder.num_patches**0.5)
    pos_embed = get_2d_sincos_pos_embed(model.pos_embed.shape[-1], grid_size)
    model.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for module in [*model.blocks, model.final_layer]:
        if hasattr(module, "adaLN_modulation"):
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


# --- fixed 2-D sin-cos position embedding (float64, as the release computes it) -------------


def get_1d_sincos_pos_embed(embed_dim, positions):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim): the first half encodes a token's column, the second its row
    (the release builds the grid with the width coordinate first)."""
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32), indexing="ij")
    return np.concatenate(
        [get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)], axis=1
    )


# --- the paper's configurations -----------------------------------------------------------

DIT_CONFIGS = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


class ModelRegistry(dict):
    """Model name -> constructor. The names are the paper's ("DiT-XL/2"); the checkpoints' spelling
    ("DiT-XL-2", as in DiT-XL-2-256x256.pt and facebook/DiT-XL-2-256) finds the same model. An unknown
    name lists the valid ones."""

    @staticmethod
    def canonical(name):
        """"DiT-XL-2" -> "DiT-XL/2"; any other value unchanged."""
        match = re.fullmatch(r"(DiT-[A-Z]+)-(\d+)", name) if isinstance(name, str) else None
        return f"{match[1]}/{match[2]}" if match else name

    def __missing__(self, name):
        canonical = self.canonical(name)
        if canonical != name and dict.__contains__(self, canonical):
            return self[canonical]
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(self)}")

    def __contains__(self, name):
        return dict.__contains__(self, self.canonical(name))

    def get(self, name, default=None):
        return self[name] if name in self else default


def model_constructors(model_class):
    """{"DiT-S/2": ctor, ..., "DiT-XL/8": ctor} for the 12 paper configurations."""

    def constructor(size, patch):
        def build(**kwargs):
            return model_class(patch_size=patch, **DIT_CONFIGS[size], **kwargs)

        build.__name__ = f"DiT_{size}_{patch}"
        return build

    return ModelRegistry(
        {f"DiT-{size}/{patch}": constructor(size, patch) for size in DIT_CONFIGS for patch in (2, 4, 8)}
    )


DiT_models = model_constructors(DiT)

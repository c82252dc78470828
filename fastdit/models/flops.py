"""Analytic FLOP counts of DiT, per image, for throughput and MFU figures.

Counted: every matrix product of a forward (the patchify conv, every linear layer, q k^T and
softmax(.) v), as one multiply-accumulate (MAC) per multiply-add; FLOPs = 2 MACs. This is exactly
what ``torch.utils.flop_counter`` counts (in FLOPs), and within 0.1% of what the paper reports as
"Gflops" (MACs: DiT-XL/2 at 256 px 118.6; its counter, fvcore, adds some elementwise work).
Norms, softmax, activations and the modulation are left out: a few operations per element,
under 1% of the total for every DiT configuration.
"""
import dataclasses

from fastdit.reference import ADAPTIVE_DESIGNS, CONDITION_TOKENS, DIT_CONFIGS, DiT_models, check_block_design

FREQUENCY_EMBEDDING_SIZE = 256  # the timestep embedder's sinusoidal features

# Backward of a matmul costs two matmuls of the forward's size (input and weight
# gradients), so a training step is about 3 forwards, the usual estimate for MFU.
TRAINING_FORWARDS = 3


@dataclasses.dataclass(frozen=True)
class DiTShape:
    """The sizes of a DiT that its FLOPs depend on; ``input_size`` is the latent side."""

    input_size: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    in_channels: int = 4
    out_channels: int = 8
    mlp_hidden_size: int | None = None  # None: 4 * hidden_size (mlp_ratio 4)
    block: str = "adaln-zero"  # the paper's block design

    def __post_init__(self):
        check_block_design(self.block)
        if self.mlp_hidden_size is None:
            object.__setattr__(self, "mlp_hidden_size", 4 * self.hidden_size)  # frozen: set once, here

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


def named_shape(name: str, input_size: int, in_channels: int = 4, learn_sigma: bool = True,
                block: str = "adaln-zero") -> DiTShape:
    """The shape of ``fastdit.DiT_models[name](input_size=...)``, e.g. ``named_shape("DiT-XL/2", 32)``."""
    if name not in DiT_models:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(DiT_models)}")
    size, patch = name.removeprefix("DiT-").split("/")
    patch = int(patch)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 or input_size % patch:
        raise ValueError(f"input_size: expected a positive multiple of the patch size {patch} (latent side, "
                         f"image size / 8), got {input_size!r}")
    return DiTShape(input_size=input_size, patch_size=patch, in_channels=in_channels,
                    out_channels=in_channels * (2 if learn_sigma else 1), block=block, **DIT_CONFIGS[size])


def shape_of(model) -> DiTShape:
    """The shape of a built model (``fastdit.DiT`` or ``fastdit.reference.DiT``, or a compiled one)."""
    return DiTShape(
        input_size=model.input_size,
        patch_size=model.patch_size,
        hidden_size=model.pos_embed.shape[-1],
        depth=len(model.blocks),
        num_heads=model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        mlp_hidden_size=model.blocks[0].mlp.fc1.out_features if len(model.blocks) else None,
        block=model.block,
    )


def attention_macs(tokens: int, hidden_size: int) -> int:
    """q k^T and softmax(.) v of one image, all heads: tokens^2 x head_dim each, per head."""
    return 2 * tokens * tokens * hidden_size


def forward_macs_by_part(shape: DiTShape) -> dict[str, int]:
    """MACs of one image's forward, by part of the model."""
    d, tokens, depth = shape.hidden_size, shape.tokens, shape.depth
    mlp = shape.mlp_hidden_size
    patch_features = shape.in_channels * shape.patch_size**2
    # In-context conditioning runs the blocks on the image tokens and the [t, y] tokens.
    sequence = tokens + CONDITION_TOKENS if shape.block == "in-context" else tokens
    parts = {
        "patch_embed": tokens * patch_features * d,
        "timestep_embed": FREQUENCY_EMBEDDING_SIZE * d + d * d,
        "attention_projections": depth * sequence * 4 * d * d,  # qkv (3 d^2) and proj (d^2)
        "attention_scores": depth * attention_macs(sequence, d),
        "mlp": depth * sequence * 2 * d * mlp,
        "final_layer": tokens * d * shape.patch_size**2 * shape.out_channels,
    }
    if shape.block in ADAPTIVE_DESIGNS:  # per image, not per token: (6 or 4) d per block, 2 d final
        parts["adaln_modulation"] = depth * d * (6 if shape.block == "adaln-zero" else 4) * d + d * 2 * d
    if shape.block == "cross-attn":  # q and proj per image token, k and v per [t, y] token, scores to 2 keys
        parts["cross_attention"] = depth * (
            2 * tokens * d * d + CONDITION_TOKENS * 2 * d * d + 2 * tokens * CONDITION_TOKENS * d
        )
    return parts


def forward_macs(shape: DiTShape) -> int:
    """MACs of one image's forward (the paper's "Gflops" x 1e9)."""
    return sum(forward_macs_by_part(shape).values())


def forward_flops(shape: DiTShape) -> int:
    """FLOPs of one image's forward: 2 x MACs."""
    return 2 * forward_macs(shape)


def workload_flops(shape: DiTShape, workload: str) -> int:
    """FLOPs per image of a benchmark workload: ``"forward"``; ``"sampling-step"`` (one guided
    step: the model runs on the image and on its unconditional copy); ``"training-step"``;
    ``"sampling-run"`` (the release's 250 guided steps)."""
    forwards = {"forward": 1, "sampling-step": 2, "training-step": TRAINING_FORWARDS, "sampling-run": 2 * 250}
    if workload not in forwards:
        raise ValueError(f"workload: expected one of {', '.join(forwards)}, got {workload!r}")
    return forwards[workload] * forward_flops(shape)


# --- per operation: the matrix products one by one, for the roofline (fastdit/bench/roofline.py) ---


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear layer of a forward (the patchify conv is one: a linear map of each patch), run
    ``count`` times (once per block for a block's layer) on ``rows`` rows per image: its tokens, or
    1 for a layer that acts on the conditioning vector once per image."""

    name: str
    part: str  # the key of forward_macs_by_part that it counts towards
    rows: int
    in_features: int
    out_features: int
    count: int = 1

    @property
    def macs(self) -> int:
        return self.count * self.rows * self.in_features * self.out_features


@dataclasses.dataclass(frozen=True)
class AttentionProduct:
    """q k^T and softmax(.) v of one attention per image, all heads, run ``count`` times."""

    name: str
    part: str
    queries: int
    keys: int
    hidden_size: int
    count: int = 1

    @property
    def macs(self) -> int:
        return self.count * 2 * self.queries * self.keys * self.hidden_size


def forward_linears(shape: DiTShape) -> list[Linear]:
    """Every linear layer of one image's forward, in the order the model runs them."""
    d, tokens, depth = shape.hidden_size, shape.tokens, shape.depth
    sequence = tokens + CONDITION_TOKENS if shape.block == "in-context" else tokens
    linears = [
        Linear("patch_embed", "patch_embed", tokens, shape.in_channels * shape.patch_size**2, d),
        Linear("timestep_fc1", "timestep_embed", 1, FREQUENCY_EMBEDDING_SIZE, d),
        Linear("timestep_fc2", "timestep_embed", 1, d, d),
    ]
    if shape.block in ADAPTIVE_DESIGNS:
        modulations = 6 if shape.block == "adaln-zero" else 4
        linears.append(Linear("adaln_modulation", "adaln_modulation", 1, d, modulations * d, depth))
    linears += [Linear("qkv", "attention_projections", sequence, d, 3 * d, depth),
                Linear("attn_proj", "attention_projections", sequence, d, d, depth)]
    if shape.block == "cross-attn":
        linears += [Linear("cross_q", "cross_attention", tokens, d, d, depth),
                    Linear("cross_kv", "cross_attention", CONDITION_TOKENS, d, 2 * d, depth),
                    Linear("cross_proj", "cross_attention", tokens, d, d, depth)]
    linears += [Linear("fc1", "mlp", sequence, d, shape.mlp_hidden_size, depth),
                Linear("fc2", "mlp", sequence, shape.mlp_hidden_size, d, depth)]
    if shape.block in ADAPTIVE_DESIGNS:
        linears.append(Linear("final_modulation", "adaln_modulation", 1, d, 2 * d))
    linears.append(Linear("final_linear", "final_layer", tokens, d, shape.patch_size**2 * shape.out_channels))
    return linears


def forward_attention_products(shape: DiTShape) -> list[AttentionProduct]:
    """The attention score products of one image's forward."""
    d, tokens, depth = shape.hidden_size, shape.tokens, shape.depth
    sequence = tokens + CONDITION_TOKENS if shape.block == "in-context" else tokens
    products = [AttentionProduct("attention", "attention_scores", sequence, sequence, d, depth)]
    if shape.block == "cross-attn":
        products.append(AttentionProduct("cross_attention_scores", "cross_attention", tokens, CONDITION_TOKENS, d,
                                         depth))
    return products


def forward_macs_by_op(shape: DiTShape) -> dict[str, int]:
    """MACs of one image's forward, by operation; they sum to ``forward_macs``."""
    return {op.name: op.macs for op in [*forward_linears(shape), *forward_attention_products(shape)]}

"""diffusers' ``DiTTransformer2DModel`` weights and config <-> the release's, strictly.

The two hold the same tensors under other names, except in three places: diffusers splits the
release's fused qkv into ``to_q``/``to_k``/``to_v``; it keeps a copy of the timestep and class
embedders in every block (the copies must be equal: one set of weights goes into the release's
model); and it does not store the fixed sin-cos position table, which is regenerated here as the
release builds it. Every key of either side is used once; anything else is a ``CheckpointError``.

This module needs neither diffusers nor a model: it maps dicts of tensors, so ``fastdit.load``
reads a diffusers folder without diffusers installed.
"""
import torch

from fastdit import reference
from fastdit.models.config import RELEASE_CLASS_DROPOUT, CheckpointError

# The class names a diffusers DiT's config.json carries: DiTPipeline's own class, and the generic
# one that facebook/DiT-XL-2-256 and -512 were first published with (diffusers remaps it).
DIFFUSERS_CLASS = "DiTTransformer2DModel"
LEGACY_CLASS = "Transformer2DModel"
# DiTTransformer2DModel's constructor defaults: diffusers fills a key missing from config.json
# with them, so a reader must too.
DIFFUSERS_DEFAULTS = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
    dropout=0.0, norm_num_groups=32, attention_bias=True, sample_size=32, patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
    norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5,
)
# What the release's architecture is in diffusers' terms; any other value is another model.
REQUIRED = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                norm_elementwise_affine=False)
# diffusers' FeedForward widens by a fixed 4 (its `mult`), its label table always has the null
# row (LabelEmbedding with dropout 0.1), and its only block is adaLN-Zero.
DIFFUSERS_MLP_RATIO = 4.0
# The release's LayerNorm eps, written as diffusers' norm_eps so that diffusers' MLP norm (its
# only norm that reads norm_eps) computes the release's; diffusers' default is 1e-5.
RELEASE_NORM_EPS = 1e-6

EMBEDDER_KEYS = {  # diffusers' per-block embedder (under transformer_blocks.<i>.norm1.emb.) -> release
    "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
}
BLOCK_KEYS = {  # diffusers (under transformer_blocks.<i>.) -> release (under blocks.<i>.)
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")  # concatenated in this order into attn.qkv
OUTER_KEYS = {  # outside the blocks
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
PARAMETERS = ("weight", "bias")


def renamed_keys(table: dict, diffusers_prefix: str = "", release_prefix: str = "") -> list[tuple[str, str]]:
    """(diffusers key, release key) of every parameter of ``table``'s modules (OUTER_KEYS, or BLOCK_KEYS under a
    block's prefixes): the tensors both sides hold under other names only. Both directions walk this list."""
    return [(f"{diffusers_prefix}{diffusers_name}.{parameter}", f"{release_prefix}{release_name}.{parameter}")
            for diffusers_name, release_name in table.items() for parameter in PARAMETERS]


# --- configs --------------------------------------------------------------------------------


def diffusers_config_to_release(config: dict, source="config") -> dict:
    """fastdit's constructor arguments (``fastdit.models.config.CONFIG_KEYS``) for a diffusers DiT config."""
    if not isinstance(config, dict):
        raise TypeError(f"{source}: expected a dict (a diffusers config.json), got {type(config).__name__}")
    config = {**DIFFUSERS_DEFAULTS, **{key: value for key, value in config.items() if not key.startswith("_")}}
    for key, expected in REQUIRED.items():
        if config[key] != expected:
            raise CheckpointError(f"{source}: {key} is {config[key]!r}; the release's DiT is {expected!r}")
    if not isinstance(config["num_embeds_ada_norm"], int):
        raise CheckpointError(f"{source}: num_embeds_ada_norm (the number of classes) must be an integer, "
                              f"got {config['num_embeds_ada_norm']!r}")
    in_channels = config["in_channels"]
    out_channels = in_channels if config["out_channels"] is None else config["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{source}: out_channels must be in_channels ({in_channels}) or twice it (learned "
                              f"sigma), got {out_channels}")
    return dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=in_channels,
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
        depth=config["num_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=DIFFUSERS_MLP_RATIO,
        class_dropout_prob=RELEASE_CLASS_DROPOUT,
        num_classes=config["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels,
        block="adaln-zero",
    )


def release_config_to_diffusers(config: dict) -> dict:
    """``DiTTransformer2DModel``'s constructor arguments for fastdit's; models diffusers cannot hold are refused."""
    problems = []
    if config["block"] != "adaln-zero":
        problems.append(f"block is {config['block']!r} (diffusers' DiT has only adaLN-Zero blocks)")
    if config["mlp_ratio"] != DIFFUSERS_MLP_RATIO:
        problems.append(f"mlp_ratio is {config['mlp_ratio']} (diffusers' DiT MLP is {DIFFUSERS_MLP_RATIO:g}x wide)")
    if not config["class_dropout_prob"] > 0:
        problems.append("the model has no null class (class_dropout_prob 0; diffusers' label table always has it)")
    if config["hidden_size"] % config["num_heads"]:
        problems.append(f"num_heads {config['num_heads']} does not divide hidden_size {config['hidden_size']}")
    if problems:
        raise CheckpointError(f"this model cannot be written as a diffusers {DIFFUSERS_CLASS}: {'; '.join(problems)}")
    in_channels = config["in_channels"]
    return {
        **DIFFUSERS_DEFAULTS,
        "num_attention_heads": config["num_heads"],
        "attention_head_dim": config["hidden_size"] // config["num_heads"],
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if config["learn_sigma"] else in_channels,
        "num_layers": config["depth"],
        "sample_size": config["input_size"],
        "patch_size": config["patch_size"],
        "num_embeds_ada_norm": config["num_classes"],
        "norm_eps": RELEASE_NORM_EPS,
    }


# --- state dicts ----------------------------------------------------------------------------


def position_table(hidden_size: int, grid_size: int, dtype=torch.float32) -> torch.Tensor:
    """(1, grid_size**2, hidden_size): the release's fixed sin-cos table. Rounded through float32 as
    the release's model holds it, so a half-precision copy rounds as ``model.half()`` would."""
    table = torch.from_numpy(reference.get_2d_sincos_pos_embed(hidden_size, grid_size))
    return table.float().to(dtype).unsqueeze(0)


def diffusers_to_release(state_dict: dict, config: dict, source="the diffusers state dict") -> tuple[dict, dict]:
    """(the release's state dict, fastdit's config) for a diffusers DiT's state dict and config."""
    release_config = diffusers_config_to_release(config, source)
    tensors = _Keys(state_dict, source)
    converted = {release_key: tensors.take(diffusers_key) for diffusers_key, release_key in renamed_keys(OUTER_KEYS)}
    for index in range(release_config["depth"]):
        block = f"transformer_blocks.{index}."
        for diffusers_key, release_key in renamed_keys(BLOCK_KEYS, block, f"blocks.{index}."):
            converted[release_key] = tensors.take(diffusers_key)
        for parameter in PARAMETERS:
            qkv = [tensors.take(f"{block}{name}.{parameter}") for name in QKV]
            converted[f"blocks.{index}.attn.qkv.{parameter}"] = torch.cat(qkv, dim=0)
        for diffusers_name, release_name in EMBEDDER_KEYS.items():
            copy = tensors.take(f"{block}norm1.emb.{diffusers_name}")
            if index == 0:
                converted[release_name] = copy
            elif not torch.equal(copy, converted[release_name]):
                raise CheckpointError(
                    f"{source}: {block}norm1.emb.{diffusers_name} differs from transformer_blocks.0's copy; the "
                    f"release's DiT has one {release_name.split('.')[0]}, so every block's copy must be equal"
                )
    hidden_size = release_config["hidden_size"]
    grid_size = release_config["input_size"] // release_config["patch_size"]
    table = position_table(hidden_size, grid_size, converted["x_embedder.proj.weight"].dtype)
    if "pos_embed.pos_embed" in state_dict:  # diffusers never saves its buffer; older writers may have
        _check_position_table(tensors.take("pos_embed.pos_embed"), table, f"{source}: pos_embed.pos_embed")
    converted["pos_embed"] = table
    tensors.check_all_used()
    return converted, release_config


def release_to_diffusers(state_dict: dict, config: dict, source="the model") -> tuple[dict, dict]:
    """(diffusers' state dict, ``DiTTransformer2DModel``'s config) for the release's state dict and fastdit's config.
    Each block gets its own copy of the embedders (safetensors stores no shared tensors)."""
    diffusers_config = release_config_to_diffusers(config)
    tensors = _Keys(state_dict, source)
    grid_size = config["input_size"] // config["patch_size"]
    position = tensors.take("pos_embed")
    table = position_table(config["hidden_size"], grid_size, position.dtype)
    _check_position_table(position, table, f"{source}: pos_embed")
    converted = {diffusers_key: tensors.take(release_key) for diffusers_key, release_key in renamed_keys(OUTER_KEYS)}
    embedders = {name: tensors.take(name) for name in EMBEDDER_KEYS.values()}
    for index in range(config["depth"]):
        block = f"transformer_blocks.{index}."
        for diffusers_key, release_key in renamed_keys(BLOCK_KEYS, block, f"blocks.{index}."):
            converted[diffusers_key] = tensors.take(release_key)
        for parameter in PARAMETERS:
            qkv = tensors.take(f"blocks.{index}.attn.qkv.{parameter}").chunk(3, dim=0)
            converted.update({f"{block}{name}.{parameter}": part.clone() for name, part in zip(QKV, qkv)})
        for diffusers_name, release_name in EMBEDDER_KEYS.items():
            converted[f"{block}norm1.emb.{diffusers_name}"] = embedders[release_name].clone()
    tensors.check_all_used()
    return converted, diffusers_config


class _Keys:
    """A state dict whose keys are each taken once; a missing key, or one never taken, is an error."""

    def __init__(self, state_dict, source):
        if not isinstance(state_dict, dict):
            raise TypeError(f"{source}: expected a state dict (a dict of tensors), got {type(state_dict).__name__}")
        self.state_dict, self.source, self.used = state_dict, source, set()

    def take(self, key):
        if key not in self.state_dict:
            raise CheckpointError(f"{self.source} has no {key!r}: it is not a DiT of this config (its keys begin "
                                  f"{', '.join(list(self.state_dict)[:5])})")
        self.used.add(key)
        return self.state_dict[key]

    def check_all_used(self):
        left = [key for key in self.state_dict if key not in self.used]
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise CheckpointError(f"{self.source} has keys a DiT of this config does not: {shown}")


def _check_position_table(actual, table, name):
    # Two roundings of the same float64 table (numpy on different machines) may differ in the last
    # bit: allow two units of the dtype's roundoff on values in [-1, 1], far below any trained change.
    tolerance = 2 * torch.finfo(actual.dtype).eps
    if actual.shape != table.shape or (actual.float() - table.float()).abs().max() > tolerance:
        raise CheckpointError(
            f"{name} is not the fixed sin-cos position table of shape {tuple(table.shape)}: diffusers "
            f"regenerates the table and stores none, so these weights cannot be converted faithfully"
        )

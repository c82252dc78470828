"""diffusers' DiT <-> the release's: parity with the two known differences patched, the size of those
differences unpatched, a bit-equal round trip, and the strictness of the key mapping."""
import pytest
import torch
from parity import launches_kernels

import fastdit
from fastdit import reference
from fastdit.integrations.diffusers_convert import (
    EMBEDDER_KEYS,
    diffusers_to_release,
    position_table,
    release_to_diffusers,
)
from fastdit.models.checkpoint import CheckpointError, model_config
from fastdit.models.parity import relative_max_error

pytest.importorskip("diffusers")

# The bound for the converted model against diffusers with both differences patched, fp32.
PARITY = 1e-5


def converted(diffusers_model, model_class=reference.DiT):
    state_dict, config = diffusers_to_release(diffusers_model.state_dict(), dict(diffusers_model.config))
    model = model_class(**config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def diffusers_output(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("model_class", [reference.DiT, pytest.param(fastdit.DiT, marks=launches_kernels)])
def test_converted_model_equals_patched_diffusers(tiny_diffusers, tiny_inputs, patch_to_release, model_class,
                                                  learn_sigma):
    diffusers_model = tiny_diffusers(learn_sigma=learn_sigma)
    model = converted(diffusers_model, model_class)
    x, t, y = tiny_inputs
    expected = diffusers_output(patch_to_release(diffusers_model), x, t, y)
    with torch.no_grad():
        assert relative_max_error(model(x, t, y), expected) <= PARITY


def test_each_unpatched_difference_shows(tiny_diffusers, tiny_inputs, patch_to_release):
    """Each difference alone moves diffusers' output measurably, so the parity test above needs both
    patches. The timestep shift grows with t (at t = 0 every frequency gives cos 1, sin 0) and passes
    1e-2 by t = 999; the eps is small on unit-scale activations (measured 1e-6 to 4.5e-6 relative on
    this model against 1e-7 to 2e-7 with both patched): it must stay above 5x the patched error."""
    x, t, y = tiny_inputs
    diffusers_model = tiny_diffusers()
    with torch.no_grad():
        expected = converted(diffusers_model)(x, t, y)

    def error(output, where=slice(None)):
        return relative_max_error(output[where], expected[where])

    unpatched = diffusers_output(diffusers_model, x, t, y)
    for block in diffusers_model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    eps_unpatched = diffusers_output(diffusers_model, x, t, y)
    both_patched = diffusers_output(patch_to_release(diffusers_model), x, t, y)
    assert error(both_patched) <= PARITY
    assert error(eps_unpatched) > 5 * error(both_patched)
    assert error(unpatched, t == 999) > 1e-2
    assert error(unpatched, t == 0) < 1e-5  # the shift does not act at t = 0: only the eps is left


def test_round_trip_is_bit_equal(tiny_fastdit):
    model = tiny_fastdit()
    state_dict = model.state_dict()
    diffusers_state, diffusers_config = release_to_diffusers(state_dict, model_config(model))
    back, config = diffusers_to_release(diffusers_state, diffusers_config)
    assert config == model_config(model)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_round_trip_from_diffusers_is_bit_equal(tiny_diffusers):
    diffusers_model = tiny_diffusers()
    state_dict, config = diffusers_to_release(diffusers_model.state_dict(), dict(diffusers_model.config))
    back, _ = release_to_diffusers(state_dict, config)
    original = diffusers_model.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


@pytest.mark.parametrize("embedder_key", list(EMBEDDER_KEYS))
def test_differing_embedder_copies_are_refused(tiny_diffusers, embedder_key):
    diffusers_model = tiny_diffusers()
    state_dict = dict(diffusers_model.state_dict())
    key = f"transformer_blocks.1.norm1.emb.{embedder_key}"
    state_dict[key] = state_dict[key].clone()
    state_dict[key].view(-1)[0] += 1e-3
    with pytest.raises(CheckpointError, match=f"{key} differs from transformer_blocks.0's copy"):
        diffusers_to_release(state_dict, dict(diffusers_model.config))


def test_missing_and_unexpected_keys_are_refused(tiny_diffusers):
    diffusers_model = tiny_diffusers()
    config = dict(diffusers_model.config)
    missing = dict(diffusers_model.state_dict())
    del missing["transformer_blocks.1.attn1.to_k.bias"]
    with pytest.raises(CheckpointError, match="has no 'transformer_blocks.1.attn1.to_k.bias'"):
        diffusers_to_release(missing, config)
    extra = {**diffusers_model.state_dict(), "transformer_blocks.2.norm1.linear.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="does not: transformer_blocks.2.norm1.linear.weight"):
        diffusers_to_release(extra, config)


def test_position_table_is_checked(tiny_fastdit, tiny_diffusers):
    model = tiny_fastdit()
    model.pos_embed.data[0, 0, 0] += 1e-3  # a learned position table: diffusers cannot hold it
    with pytest.raises(CheckpointError, match="pos_embed is not the fixed sin-cos position table"):
        release_to_diffusers(model.state_dict(), model_config(model))
    diffusers_model = tiny_diffusers()
    table = position_table(16, 4)
    state_dict = {**diffusers_model.state_dict(), "pos_embed.pos_embed": table}
    converted_state, _ = diffusers_to_release(state_dict, dict(diffusers_model.config))
    assert torch.equal(converted_state["pos_embed"], table)
    state_dict["pos_embed.pos_embed"] = table + 1e-3
    with pytest.raises(CheckpointError, match="pos_embed.pos_embed is not the fixed sin-cos"):
        diffusers_to_release(state_dict, dict(diffusers_model.config))


def test_position_table_is_the_releases():
    model = reference.DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    assert torch.equal(position_table(16, 4), model.pos_embed.data)
    assert torch.equal(position_table(16, 4, torch.float16), model.half().pos_embed.data)


@pytest.mark.parametrize("change, message", [
    (dict(norm_type="ada_norm"), "norm_type is 'ada_norm'"),
    (dict(activation_fn="geglu"), "activation_fn is 'geglu'"),
    (dict(out_channels=5), "out_channels must be in_channels"),
    (dict(num_embeds_ada_norm=None), "num_embeds_ada_norm"),
])
def test_other_diffusers_models_are_refused(tiny_diffusers, change, message):
    diffusers_model = tiny_diffusers()
    with pytest.raises(CheckpointError, match=message):
        diffusers_to_release(diffusers_model.state_dict(), {**diffusers_model.config, **change})


def test_missing_config_keys_take_diffusers_defaults(tiny_diffusers):
    """diffusers fills a key missing from config.json with DiTTransformer2DModel's default: so does fastdit."""
    from diffusers import DiTTransformer2DModel

    defaults = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=4,
                                     num_embeds_ada_norm=3)
    _, config = diffusers_to_release(defaults.state_dict(), dict(num_attention_heads=2, attention_head_dim=8,
                                                                   num_layers=1, sample_size=4, num_embeds_ada_norm=3))
    assert (config["patch_size"], config["in_channels"], config["learn_sigma"]) == (2, 4, False)


@pytest.mark.parametrize("change, message", [
    (dict(block="adaln"), "block is 'adaln'"),
    (dict(mlp_ratio=2.0), "mlp_ratio is 2.0"),
    (dict(class_dropout_prob=0.0), "no null class"),
])
def test_models_diffusers_cannot_hold_are_refused(tiny_fastdit, change, message):
    model = tiny_fastdit(**change)
    with pytest.raises(CheckpointError, match=message):
        release_to_diffusers(model.state_dict(), model_config(model))

"""The reference model against the facts of the paper and its release."""
import os

import pytest
import torch
from parity import assert_parity

import fastdit
from fastdit import reference

DATA = os.path.join(os.path.dirname(__file__), "data")

# (depth, hidden, heads) from Table 1 of the paper.
PAPER_CONFIGS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def test_release_checkpoint_loads_strictly_and_reproduces_release_outputs():
    """tests/data/release_dit_tiny.pt holds a small DiT built with the release's models.py
    (facebookresearch/DiT @ ed81ce2, timm attention), its weights perturbed, its inputs and
    the release's outputs for ``forward`` and ``forward_with_cfg`` (scale 4)."""
    release = torch.load(os.path.join(DATA, "release_dit_tiny.pt"), weights_only=True)
    model = reference.DiT(**release["config"]).eval()
    model.load_state_dict(release["state_dict"], strict=True)
    with torch.no_grad():
        out = model(release["x"], release["t"], release["y"])
        cfg_out = model.forward_with_cfg(release["x"], release["t"], release["y"], release["cfg_scale"])
    assert_parity(out, release["out"], 1e-5, "forward")
    assert_parity(cfg_out, release["cfg_out"], 1e-5, "forward_with_cfg")


@pytest.mark.parametrize("name", list(reference.DiT_models))
def test_configs_follow_the_paper(name):
    size, patch = name[len("DiT-") :].split("/")
    with torch.device("meta"):
        model = reference.DiT_models[name]()
    depth, hidden, heads = PAPER_CONFIGS[size]
    assert (len(model.blocks), model.pos_embed.shape[-1], model.num_heads, model.patch_size) == (
        depth,
        hidden,
        heads,
        int(patch),
    )
    assert model.out_channels == 8 and model.y_embedder.embedding_table.num_embeddings == 1001


@pytest.mark.parametrize("models", [reference.DiT_models, fastdit.DiT_models], ids=["reference", "fast"])
def test_the_checkpoints_spelling_names_the_same_model(models):
    assert "DiT-XL-2" in models and models.get("DiT-B-4") is models["DiT-B/4"]
    assert models["DiT-XL-2"] is models["DiT-XL/2"]
    assert "DiT-XL-3" not in models and models.get("DiT-XL-3") is None and "DiT-XL/2" in list(models)
    with pytest.raises(KeyError, match=r"unknown model 'DiT-XL-3'; valid names: DiT-S/2"):
        models["DiT-XL-3"]


def test_xl2_has_675m_parameters():
    with torch.device("meta"):
        model = reference.DiT_models["DiT-XL/2"]()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_state_dict_keys_match_the_release():
    model = reference.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "pos_embed": (1, 16, 32),
        "x_embedder.proj.weight": (32, 4, 2, 2),
        "x_embedder.proj.bias": (32,),
        "t_embedder.mlp.0.weight": (32, 256),
        "t_embedder.mlp.0.bias": (32,),
        "t_embedder.mlp.2.weight": (32, 32),
        "t_embedder.mlp.2.bias": (32,),
        "y_embedder.embedding_table.weight": (11, 32),
        "blocks.0.attn.qkv.weight": (96, 32),
        "blocks.0.attn.qkv.bias": (96,),
        "blocks.0.attn.proj.weight": (32, 32),
        "blocks.0.attn.proj.bias": (32,),
        "blocks.0.mlp.fc1.weight": (128, 32),
        "blocks.0.mlp.fc1.bias": (128,),
        "blocks.0.mlp.fc2.weight": (32, 128),
        "blocks.0.mlp.fc2.bias": (32,),
        "blocks.0.adaLN_modulation.1.weight": (192, 32),
        "blocks.0.adaLN_modulation.1.bias": (192,),
        "final_layer.linear.weight": (32, 32),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (64, 32),
        "final_layer.adaLN_modulation.1.bias": (64,),
    }
    assert not model.pos_embed.requires_grad


def test_adaln_zero_init_outputs_zero():
    model = reference.DiT(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([3, 10]))
    assert out.shape == (2, 8, 8, 8) and torch.count_nonzero(out) == 0


def test_no_null_class_without_class_dropout():
    model = reference.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10, class_dropout_prob=0)
    assert model.y_embedder.embedding_table.num_embeddings == 10


def test_sincos_position_embedding_layout():
    """First half of the channels encodes a token's column, the second half its row."""
    embed = torch.from_numpy(reference.get_2d_sincos_pos_embed(8, 3))  # tokens row-major over a 3x3 grid
    row, col = 1, 2
    token = embed[row * 3 + col]
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(token, expected)


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 10.0])
    emb = reference.timestep_embedding(t, 6)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert reference.timestep_embedding(t, 7).shape == (2, 7)


def test_guidance_on_all_channels():
    out = torch.randn(4, 8, 2, 2)
    guided = reference.classifier_free_guidance(out, 2.0, channels=None)
    torch.testing.assert_close(guided[:2], out[2:] + 2.0 * (out[:2] - out[2:]))
    guided3 = reference.classifier_free_guidance(out, 2.0)
    torch.testing.assert_close(guided3[:, 3:], out[:, 3:])

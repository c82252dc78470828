"""Tiny random DiTs on both sides of the diffusers conversion: fast to build, with weights that make
every difference show (DiT's zero init makes a fresh model output zeros, so the weights are perturbed)."""
import pytest
import torch
from parity import perturb_

import fastdit
from fastdit.integrations.diffusers_convert import position_table

# hidden 16 in 2 heads, 2 blocks, a 4x4 grid of 2x2 patches over 4 latent channels
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2)
NUM_CLASSES = 10


def tie_embedders_(model):
    """diffusers builds each block's copy of the timestep and class embedders with its own random
    init; a converted checkpoint has equal copies (the release has one embedder)."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def patch_to_release_(model):
    """diffusers' two known differences from the release, undone: the timestep frequencies divide by
    half - 1 (downscale_freq_shift=1; the release divides by half), and the LayerNorm before the MLP
    (norm3) takes norm_eps (default 1e-5; the release's is 1e-6)."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    return model


@pytest.fixture
def patch_to_release():
    return patch_to_release_


@pytest.fixture
def tiny_diffusers():
    """A factory of tiny diffusers DiTs with perturbed, tied weights, in eval mode."""
    from diffusers import DiTTransformer2DModel

    def make(num_classes=NUM_CLASSES, learn_sigma=True, seed=0):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(
            num_attention_heads=TINY["num_heads"], attention_head_dim=TINY["hidden_size"] // TINY["num_heads"],
            in_channels=TINY["in_channels"], out_channels=TINY["in_channels"] * (2 if learn_sigma else 1),
            num_layers=TINY["depth"], sample_size=TINY["input_size"], patch_size=TINY["patch_size"],
            num_embeds_ada_norm=num_classes,
        )
        return tie_embedders_(perturb_(model, seed=seed)).eval()

    return make


@pytest.fixture
def tiny_fastdit():
    """A factory of tiny fastdit DiTs with perturbed weights and the fixed position table (which no
    training changes and diffusers does not store), in eval mode."""

    def make(num_classes=NUM_CLASSES, seed=0, **config):
        torch.manual_seed(seed)
        model = perturb_(fastdit.DiT(**{**TINY, "num_classes": num_classes, **config}), seed=seed)
        grid = model.input_size // model.patch_size
        model.pos_embed.data.copy_(position_table(model.pos_embed.shape[-1], grid))
        return model.eval()

    return make


@pytest.fixture
def tiny_inputs():
    """Latents, timesteps from 0 to 999 (diffusers' timestep difference grows with t), and labels
    with the last class and the null class."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=generator)
    t = torch.tensor([0, 1, 100, 500, 600, 999])
    y = torch.tensor([0, 1, 2, 3, NUM_CLASSES - 1, NUM_CLASSES])
    return x, t, y


@pytest.fixture
def cached_repo(tiny_diffusers, tmp_path, monkeypatch):
    """A tiny diffusers DiT saved as "facebook/DiT-tiny" in a local Hugging Face cache under tmp_path (its
    layout: models--owner--name/refs/main and snapshots/<commit>/), made the current cache; the working
    directory moves to tmp_path, where no path "facebook/DiT-tiny" exists. Returns the model."""
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--facebook--DiT-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = tiny_diffusers()
    model.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    return model

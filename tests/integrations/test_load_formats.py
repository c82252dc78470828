"""fastdit.load and save_pretrained meet diffusers' formats: a transformer folder, a pipeline root and a
repo id in the local Hugging Face cache load as the fast model; format="diffusers" writes what diffusers loads."""
import pytest
import torch

import fastdit
from fastdit.integrations.diffusers_convert import diffusers_to_release
from fastdit.models.checkpoint import CheckpointError, model_config

diffusers = pytest.importorskip("diffusers")


def assert_loads_as(model, path):
    loaded = fastdit.load(path)
    expected, config = diffusers_to_release(model.state_dict(), dict(model.config))
    assert isinstance(loaded, fastdit.DiT) and model_config(loaded) == config
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_transformer_folder_and_pipeline_root(tiny_diffusers, tmp_path):
    model = tiny_diffusers()
    model.save_pretrained(tmp_path / "transformer")
    assert_loads_as(model, tmp_path / "transformer")
    vae = diffusers.AutoencoderKL(latent_channels=4, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=8)
    diffusers.DiTPipeline(transformer=model, vae=vae, scheduler=diffusers.DDIMScheduler()).save_pretrained(
        tmp_path / "pipeline")
    assert_loads_as(model, tmp_path / "pipeline")
    with pytest.raises(CheckpointError, match="is a diffusers folder, one set of weights"):
        fastdit.load(tmp_path / "pipeline", weights="ema")


def test_repo_id_from_the_local_cache(cached_repo, tmp_path):
    model = cached_repo
    assert_loads_as(model, "facebook/DiT-tiny")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        fastdit.load("facebook/DiT-other")


def test_save_pretrained_in_diffusers_format(tiny_fastdit, tiny_inputs, tmp_path):
    model = tiny_fastdit()
    model.save_pretrained(tmp_path / "diffusers", format="diffusers")
    loaded, info = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "diffusers", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    back = fastdit.load(tmp_path / "diffusers")
    x, t, y = tiny_inputs
    with torch.no_grad():
        assert torch.equal(back(x, t, y), model(x, t, y))  # bit-equal weights, the same function
    with pytest.raises(ValueError, match="format: expected one of 'fastdit', 'diffusers', got 'onnx'"):
        model.save_pretrained(tmp_path / "other", format="onnx")

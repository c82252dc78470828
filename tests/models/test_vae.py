"""The VAE wrapper on a tiny, randomly initialised AutoencoderKL saved locally (no download)."""
import re
import subprocess
import sys

import pytest
import torch
from image_data import VAE_DOWNSAMPLING

from fastdit.models.checkpoint import CheckpointError
from fastdit.models.vae import VAE


def images(batch=2, size=16):
    return torch.randint(0, 256, (batch, size, size, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_load(vae):
    assert vae.scale == VAE.SD_SCALE == 0.18215  # diffusers' default scaling_factor is Stable Diffusion's
    assert vae.shift == 0.0
    assert vae.downsampling == VAE_DOWNSAMPLING
    assert (vae.device, vae.dtype) == (torch.device("cpu"), torch.float32)
    assert not vae.autoencoder.training


def test_load_is_quiet(vae_dir, capfd):
    VAE.load(vae_dir)
    assert capfd.readouterr().err == ""


def test_decode_gives_rounded_uint8_images(vae):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    decoded = vae.decode(latents)
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 8 * VAE_DOWNSAMPLING, 8 * VAE_DOWNSAMPLING, 3)
    with torch.no_grad():
        pixels = vae.autoencoder.decode(latents / 0.18215).sample.permute(0, 2, 3, 1)
    # [-1, 1] -> [0, 255], rounded: within half a level of the exact value, everywhere.
    exact = (pixels.clamp(-1, 1) + 1) * 127.5
    assert (decoded.float() - exact).abs().max() <= 0.5 + 1e-4


def test_encode_is_the_scaled_posterior_mean(vae):
    uint8_images = images()
    latents = vae.encode(uint8_images)
    assert latents.shape == (2, 4, 16 // VAE_DOWNSAMPLING, 16 // VAE_DOWNSAMPLING)
    pixels = uint8_images.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        expected = vae.autoencoder.encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(vae.encode(pixels), expected)
    assert torch.equal(vae.encode(uint8_images), latents)


def test_scale_and_shift_come_from_the_config(vae_dir, tmp_path):
    import diffusers

    config = dict(diffusers.AutoencoderKL.load_config(vae_dir), scaling_factor=0.5, shift_factor=0.25)
    autoencoder = diffusers.AutoencoderKL.from_config(config)
    autoencoder.load_state_dict(diffusers.AutoencoderKL.from_pretrained(vae_dir).state_dict())
    autoencoder.save_pretrained(tmp_path)
    scaled = VAE.load(tmp_path)
    assert (scaled.scale, scaled.shift) == (0.5, 0.25)
    pixels = images()
    with torch.no_grad():
        mean = scaled.autoencoder.encode(scaled._pixels(pixels)).latent_dist.mean
    torch.testing.assert_close(scaled.encode(pixels), (mean - 0.25) * 0.5)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = scaled.autoencoder.decode(latents / 0.5 + 0.25).sample
    expected = (127.5 * expected + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(scaled.decode(latents), expected)


def test_encode_can_sample_the_posterior(vae):
    draw = lambda seed: vae.encode(images(), sample=True, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert not torch.equal(draw(0), vae.encode(images()))


def test_runs_in_its_dtype(vae_dir):
    vae = VAE.load(vae_dir, device="cpu", dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    latents = vae.encode(images())
    assert latents.dtype == torch.bfloat16
    assert vae.decode(latents.float()).dtype == torch.uint8


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda vae: vae.encode(images().float()), ValueError, ["images:", "(N, 3, H, W)", "(2, 16, 16, 3)"]),
        (lambda vae: vae.encode(images().long()), TypeError, ["images:", "int64"]),
        (lambda vae: vae.encode(images().numpy()), TypeError, ["images:", "ndarray"]),
        (lambda vae: vae.encode(images(size=15)), ValueError, ["images:", "downsampling factor 2", "15x15"]),
        (lambda vae: vae.decode(torch.randn(2, 3, 8, 8)), ValueError, ["latents:", "(N, 4, h, w)", "(2, 3, 8, 8)"]),
        (lambda vae: vae.decode(torch.ones(2, 4, 8, 8, dtype=torch.long)), TypeError, ["latents:", "int64"]),
    ],
)
def test_bad_inputs(vae, call, error, words):
    with pytest.raises(error) as info:
        call(vae)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_missing_or_wrong_directory(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(CheckpointError, match="VAE directory not found.*sd-vae-ft-ema.*never downloads"):
        VAE.load(tmp_path / "sd-vae-ft-ema")
    with pytest.raises(CheckpointError, match="cannot load a diffusers AutoencoderKL"):
        VAE.load(tmp_path)


def test_missing_or_unexpected_tensors_are_an_error_naming_them(vae_dir, tmp_path, capfd):
    """diffusers initialised a missing tensor at random: exit 0, and two runs gave different shards (issue 27)."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    for case, change in (("missing", lambda tensors: tensors.pop("decoder.conv_norm_out.weight")),
                         ("unexpected", lambda tensors: tensors.update(extra=torch.zeros(2)))):
        folder = tmp_path / case
        shutil.copytree(vae_dir, folder)
        tensors = dict(weights)
        change(tensors)
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
        words = ("1 tensor missing from the weights file (decoder.conv_norm_out.weight)" if case == "missing" else
                 "1 tensor in the weights file but not in the model (extra)")
        with pytest.raises(CheckpointError, match=r"^VAE \S+: its weights do not match .*" + re.escape(words)):
            VAE.load(folder)
        assert capfd.readouterr().err == ""  # diffusers' own warning would repeat it in many lines


def test_without_diffusers(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match='pip install "fastdit\\[vae\\]"'):
        VAE.load(tmp_path)


def test_importing_fastdit_does_not_import_diffusers(tmp_path):
    code = "import sys, fastdit, fastdit.models.vae, fastdit.models.checkpoint; assert 'diffusers' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

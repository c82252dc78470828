"""What `fastdit encode` reads, made here: a tiny random AutoencoderKL saved locally (no download) and a
folder of JPEG class folders. Shared by tests/train/, tests/models/test_vae.py and tests/system/test_multinode.py."""
import os

import numpy as np
import pytest
import torch

# Two encoder blocks: one halving of the resolution, so images are 2x the latents' size.
VAE_DOWNSAMPLING = 2


def save_tiny_vae(path):
    """A seeded random AutoencoderKL with 4 latent channels, saved to ``path``; skips without diffusers."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    autoencoder = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    autoencoder.save_pretrained(path)
    return path


def make_image_folder(directory, per_class=(5, 4, 3), seed=0):
    """JPEGs of several non-square sizes (12 to 59 pixels a side) in class folders ``class0``, ``class1``, ...;
    the same ``seed`` gives the same files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, count in enumerate(per_class):
        os.makedirs(directory / f"class{label}", exist_ok=True)
        for index in range(count):
            width, height = rng.integers(12, 60, 2)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / f"class{label}" / f"{index:03d}.jpg", quality=90)
    return directory

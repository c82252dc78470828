import pytest
from image_data import save_tiny_vae

from fastdit.train.vae import VAE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def vae(vae_dir):
    return VAE.load(vae_dir)

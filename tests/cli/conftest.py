"""What the `fastdit sample` tests share: a tiny pixel-space checkpoint."""
import pytest
from parity import save_tiny_checkpoint


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    """RGB pixel-space model: 8x8 images, written without a VAE."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pixel.pt", in_channels=3, input_size=8,
                                patch_size=4)

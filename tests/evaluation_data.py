"""What the evaluation tests share: a tiny feature extractor on the generic path and sample files."""
import numpy as np
import torch

from fastdit.evaluation.extractors import FeatureExtractor
from fastdit.io import write_npz_streamed


class TinyFeatures(FeatureExtractor):
    """A random conv net with the Inception extractor's outputs (pool, spatial, logits) and its rules (RGB, one
    resolution): the evaluation's generic path in milliseconds."""

    channels, same_resolution = 3, True

    def __init__(self, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.name, self.identity = "tiny", f"tiny:{seed}"
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 5)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        hidden = torch.relu(self.conv(images.permute(0, 3, 1, 2).float() / 255))
        pool = hidden.mean(dim=(2, 3))
        return {"pool": pool, "spatial": hidden[:, :2, :2, :2].flatten(1), "logits": self.head(pool)}


def random_images(seed, count, size=8, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def write_samples(path, images, **arrays):
    write_npz_streamed(path, {"images": images, "arr_0": images, **arrays})
    return str(path)

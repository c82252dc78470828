"""Training data: in-memory tensors of images (or latents) and labels, and the deterministic
order in which training visits them.

The order is a function of (seed, step) alone: a resumed run, or a run split over any number
of processes, sees exactly the batches an uninterrupted single-process run sees.
"""
import functools
import glob
import os

import numpy as np
import torch
import torch.nn.functional as F


class TensorData:
    """``images`` (N, C, H, W) float in [-1, 1] (or VAE latents), ``labels`` (N,) int64, and
    optionally ``flipped``: the horizontally mirrored images' latents (a latent's flip is not
    the flipped image's latent, so ``fastdit encode`` encodes both)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, description: str,
                 flipped: torch.Tensor | None = None):
        if len(images) == 0:
            raise ValueError(f"data: {description} holds no images")
        if len(images) != len(labels):
            raise ValueError(f"data: {description} has {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.flipped = images, labels.long(), flipped
        self.num_classes, self.description = num_classes, description

    def __len__(self):
        return len(self.images)


def load_digits(image_size: int = 16) -> TensorData:
    """scikit-learn's bundled digits (1,797 8x8 images with 17 grey levels, ten classes; no
    download), upscaled bilinearly to ``image_size`` and mapped to [-1, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return TensorData(images * 2 - 1, torch.from_numpy(digits.target), 10, "sklearn digits")


def load_latent_shards(directory: str) -> TensorData:
    """The shards ``fastdit encode`` writes: ``shard-*.npz`` with ``latents`` and ``labels``."""
    paths = sorted(glob.glob(os.path.join(directory, "shard-*.npz")))
    if not paths:
        raise ValueError(f"data: no latent shards (shard-*.npz) in {directory!r}; make them with `fastdit encode`")
    arrays = {"latents": [], "flipped": [], "labels": []}
    for path in paths:
        with np.load(path) as shard:
            for name, parts in arrays.items():
                parts.append(torch.from_numpy(shard[name]))
        # Checked once, at load, where a bad value can still be named by file and index: one pass over the
        # data costs less than one epoch of training on it, and the training loop watches only the loss.
        for name in ("latents", "flipped"):
            check_finite(arrays[name][-1], f"{path}: {name}")
    latents, flipped, labels = (torch.cat(arrays[name]) for name in ("latents", "flipped", "labels"))
    return TensorData(latents.float(), labels, int(labels.max()) + 1, f"latents in {directory}", flipped.float())


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` and the index of the first item of ``values`` (along dim 0)
    holding a NaN or an infinity."""
    if not values.is_floating_point() or values.numel() == 0:
        return
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"data: {what}[{index}] holds a non-finite value ({int(bad.sum())} of {len(values)} items "
                         "do); re-create the data (fastdit encode) or remove it")


def class_folder_files(directory: str, flag: str = "data") -> tuple[list[tuple[str, int]], int]:
    """An ImageFolder layout (one sub-directory per class, sorted names = class ids): its files as
    [(path, label)] in order, and the number of classes. ``flag`` names the argument in errors."""
    if not os.path.isdir(directory):
        raise ValueError(f"{flag}: {directory!r} is not a directory of class folders")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted(glob.glob(os.path.join(directory, name, "*"))) if os.path.isfile(path)]
    if not files:
        raise ValueError(f"{flag}: found no files in class folders under {directory!r}")
    return files, len(classes)


def load_image_folder(directory: str, image_size: int) -> TensorData:
    """``class_folder_files``' images, center-cropped and resized to ``image_size``, in [-1, 1]."""
    from PIL import Image

    files, num_classes = class_folder_files(directory)
    images, labels = [], []
    for path, label in files:
        try:
            with Image.open(path) as image:
                images.append(center_crop_resize(image.convert("RGB"), image_size))
        except OSError:
            continue  # not an image
        labels.append(label)
    if not images:
        raise ValueError(f"data: found no images in class folders under {directory!r}")
    # From uint8 pixels: always finite, unlike latent shards (load_latent_shards checks those).
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return TensorData(pixels, torch.tensor(labels), num_classes, f"images in {directory}")


def center_crop_resize(image, size: int) -> np.ndarray:
    """The ADM preprocessing: center crop to a square, resize (bicubic) to size x size, uint8 HWC."""
    from PIL import Image

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def global_batch_indices(seed: int, step: int, batch_size: int, size: int) -> torch.Tensor:
    """Indices of the ``step``-th global batch: consecutive slices of a fresh permutation per epoch."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // size, positions % size
    return torch.stack([_epoch_order(seed, int(e), size)[int(o)] for e, o in zip(epochs, offsets)])

"""Precompute (`fastdit encode`, ``fastdit.cli.encode``) VAE latents of an image folder for training.

DiT trains on latents of 256x256 (or 512x512) center crops with random horizontal flips. Both
flips of every image are encoded once here, so training reads latents and never runs the VAE.
Shards ``shard-00000.npz``... hold ``latents`` (n, C, h, w), ``flipped`` (the mirrored
image's latents) and ``labels``, written atomically one by one.
"""
import io
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdit.io import write_bytes_atomic
from fastdit.train.data import center_crop_resize
from fastdit.train.vae import VAE


def _read(path, size):
    from PIL import Image

    with Image.open(path) as image:
        return center_crop_resize(image.convert("RGB"), size)


def _write_shard(out, index, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(os.path.join(out, f"shard-{index:05d}.npz"), buffer.getvalue())


def encode_files(files: list[tuple[str, int]], vae: VAE, out: str, image_size: int, batch_size: int,
                 shard_size: int) -> int:
    """Encode ``files`` [(path, label)] (``fastdit.train.data.class_folder_files``), both flips of each
    image, into shards of ``shard_size`` images in ``out``; returns the number of shards."""
    if image_size % vae.downsampling:
        raise ValueError(f"--image-size: expected a multiple of the VAE's downsampling {vae.downsampling}, "
                         f"got {image_size}")
    os.makedirs(out, exist_ok=True)
    pending = {"latents": [], "flipped": [], "labels": []}
    shard = 0
    with tqdm(total=len(files), desc="encoding", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            images = torch.from_numpy(np.stack([_read(path, image_size) for path, _ in batch]))
            pending["latents"].append(vae.encode(images).float().cpu().numpy())
            pending["flipped"].append(vae.encode(images.flip(2)).float().cpu().numpy())
            pending["labels"].append(np.array([label for _, label in batch], dtype=np.int64))
            bar.update(len(batch))
            done = start + len(batch) == len(files)
            if sum(len(labels) for labels in pending["labels"]) >= shard_size or done:
                _write_shard(out, shard, {name: np.concatenate(parts) for name, parts in pending.items()})
                pending = {name: [] for name in pending}
                shard += 1
    return shard

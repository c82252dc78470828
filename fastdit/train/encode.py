"""`fastdit encode`: precompute VAE latents of an image folder for training.

DiT trains on latents of 256x256 (or 512x512) center crops with random horizontal flips. Both
flips of every image are encoded once here, so training reads latents and never runs the VAE.
Shards ``shard-00000.npz``... hold ``latents`` (n, C, h, w), ``flipped`` (the mirrored
image's latents) and ``labels``, written atomically one by one.
"""
import glob
import io
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdit.io import write_bytes_atomic
from fastdit.train.data import center_crop_resize
from fastdit.train.vae import VAE


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="image folder: one sub-directory per class")
    parser.add_argument("--vae", required=True, help="local directory of a diffusers AutoencoderKL")
    parser.add_argument("--out", required=True, help="directory for the latent shards")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    parser.add_argument("--device", default=None)


def image_files(directory):
    """[(path, label)] with labels from the sorted class folder names."""
    if not os.path.isdir(directory):
        raise ValueError(f"--data: {directory!r} is not a directory of class folders")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted(glob.glob(os.path.join(directory, name, "*"))) if os.path.isfile(path)]
    if not files:
        raise ValueError(f"--data: found no files in class folders under {directory!r}")
    return files


def _read(path, size):
    from PIL import Image

    with Image.open(path) as image:
        return center_crop_resize(image.convert("RGB"), size)


def _write_shard(out, index, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(os.path.join(out, f"shard-{index:05d}.npz"), buffer.getvalue())


def run(args):
    for flag in ("image_size", "batch_size", "shard_size"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    files = image_files(args.data)
    vae = VAE.load(args.vae, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.image_size % vae.downsampling:
        raise ValueError(f"--image-size: expected a multiple of the VAE's downsampling {vae.downsampling}, "
                         f"got {args.image_size}")
    os.makedirs(args.out, exist_ok=True)
    pending = {"latents": [], "flipped": [], "labels": []}
    shard = 0
    with tqdm(total=len(files), desc="encoding", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(files), args.batch_size):
            batch = files[start:start + args.batch_size]
            images = torch.from_numpy(np.stack([_read(path, args.image_size) for path, _ in batch]))
            pending["latents"].append(vae.encode(images).float().cpu().numpy())
            pending["flipped"].append(vae.encode(images.flip(2)).float().cpu().numpy())
            pending["labels"].append(np.array([label for _, label in batch], dtype=np.int64))
            bar.update(len(batch))
            done = start + len(batch) == len(files)
            if sum(len(labels) for labels in pending["labels"]) >= args.shard_size or done:
                _write_shard(args.out, shard, {name: np.concatenate(parts) for name, parts in pending.items()})
                pending = {name: [] for name in pending}
                shard += 1
    print(f"wrote {len(files)} images' latents in {shard} shard(s) to {args.out}")
    return 0

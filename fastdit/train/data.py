"""Training data, and the deterministic order in which training visits it.

Latent shards (``fastdit encode``) stay on disk: ``fastdit.train.shards.LatentShards`` memory-maps
them and ``StepBatches`` reads the rows of each step's batch, in DataLoader workers if asked, so a
process's memory does not grow with the data set. The digits and pixel image folders are small and
held in memory (``TensorData``); both kinds answer the same ``gather``.

The order is a function of (seed, step) alone: a resumed run, or a run split over any number
of processes, sees exactly the batches an uninterrupted single-process run sees. Workers fetch a
step's batch by its number and draw nothing of their own, so they cannot change it.
"""
import functools
import glob
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from fastdit import distributed
from fastdit.train.preprocess import center_crop_arr
from fastdit.train.shards import LatentShards, file_sha256


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
        self.latent_shape = tuple(images.shape[1:])

    def __len__(self):
        return len(self.images)

    def gather(self, indices) -> dict:
        """As ``LatentShards.gather``: ``latents``, ``flipped`` (None when the data has none) and
        ``labels`` of ``indices``, in their order."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return {"latents": self.images[indices], "labels": self.labels[indices],
                "flipped": None if self.flipped is None else self.flipped[indices]}


def check_finite(data: LatentShards, rank: int = 0, world_size: int = 1) -> None:
    """Raise a ValueError naming the shard file whose sha256 differs from the manifest's (a damaged copy), or
    the file and index of the first sample holding a NaN or an infinity, among the shards ``rank`` scans:
    every ``world_size``-th, so that the ranks of a run share one full read of the set instead of each making
    it. The checksums read each file once more; the scan's read then comes from the page cache."""
    mine = range(rank, len(data.counts), world_size)
    if data.latent_dtype is not None:  # the old .npz format records no checksums
        data.verify_checksums(shards=mine)
    data.check_finite(shards=mine)


def nonfinite_samples(data, indices) -> list[str]:
    """Where the samples of ``indices`` that hold a NaN or an infinity live ("<file>: <field>[<row>]" for
    shards, "sample <i>" in memory); for naming the culprit of a loss that stopped being finite."""
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    batch = data.gather(indices)
    found = []
    for field in ("latents", "flipped"):
        values = batch[field]
        if values is None:
            continue
        values = torch.as_tensor(values)
        bad = indices[(~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)).numpy()]
        if isinstance(data, LatentShards) and len(bad):
            shards, rows = data.locate(bad)
            found += [f"{data.paths[shard][field]}: {field}[{row}]" for shard, row in zip(shards, rows)]
        else:
            found += [f"{field} of sample {index}" for index in bad]
    return found


class StepBatches(torch.utils.data.Dataset):
    """Item ``step``: one rank's rows of that step's global batch, ``(x, y, t, noise)`` CPU tensors.

    Everything random (which samples, flips, label dropout, t, noise) is drawn for the whole global
    batch from a generator seeded by (seed, step), and the rank keeps its slice: a step's batch does
    not depend on the number of processes. Only the rank's rows are read from the data."""

    def __init__(self, data, seed: int, global_batch_size: int, rank: int, world_size: int, num_timesteps: int,
                 dropout_prob: float, flip: bool):
        self.data, self.seed, self.global_batch_size = data, seed, global_batch_size
        self.rows = slice(rank * (global_batch_size // world_size), (rank + 1) * (global_batch_size // world_size))
        self.num_timesteps, self.dropout_prob, self.flip = num_timesteps, dropout_prob, flip

    def __getstate__(self):
        # A worker reopens the shard folder (a stat per file) rather than receive its memory maps, which
        # pickle as copies of the data.
        state = dict(self.__dict__)
        if isinstance(self.data, LatentShards):
            state["data"] = self.data.directory
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self.data, str):
            self.data = LatentShards(self.data)

    def __getitem__(self, step: int):
        generator = step_generator(self.seed, step)
        size = self.global_batch_size
        indices = global_batch_indices(self.seed, step, size, len(self.data))
        flips = torch.rand(size, generator=generator) < 0.5
        drops = torch.rand(size, generator=generator) < self.dropout_prob
        t = torch.randint(0, self.num_timesteps, (size,), generator=generator)
        noise = torch.randn((size, *self.data.latent_shape), generator=generator)
        batch = self.data.gather(indices[self.rows])
        x, y = torch.as_tensor(batch["latents"]), torch.as_tensor(batch["labels"]).clone()
        flips, drops = flips[self.rows], drops[self.rows]
        if self.flip:
            mirrored = x.flip(-1) if batch["flipped"] is None else torch.as_tensor(batch["flipped"])
            x = torch.where(flips[:, None, None, None], mirrored, x)
        y[drops] = self.data.num_classes  # class dropout for guidance: the null class
        return x, y, t[self.rows], noise[self.rows]


def identity(source: str, data) -> dict:
    """What a resumed run must find again at --data ``source``: the folder it resolves to and a digest of what
    it holds (a shard folder's manifest, an image folder's names, labels and sizes), with the class and sample
    counts."""
    if source == "digits":
        return {"path": "digits", "num_classes": data.num_classes, "samples": len(data)}
    path = os.path.realpath(source)
    manifest = os.path.join(path, "manifest.json")
    # A shard folder by its reader, or by its manifest (whatever loader read it into memory).
    if isinstance(data, LatentShards) or os.path.isfile(manifest):
        digest = file_sha256(manifest) if os.path.exists(manifest) else None  # the old .npz format has none
    else:
        listing = [[os.path.relpath(file, path), label, os.path.getsize(file)]
                   for file, label in class_folder_files(path)[0]]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"path": path, "sha256": digest, "num_classes": data.num_classes, "samples": len(data)}


# Each use of randomness in training draws from a stream of its own, seeded from (seed, use, index) by
# numpy's SeedSequence, so no two uses share a seed: the old seed * 1_000_003 + step + 1 for a step's draws
# and seed * 1_000_003 + epoch for an epoch's order collided (epoch e's permutation was step e - 1's
# generator).
STREAMS = ("step", "epoch")


def stream_generator(seed: int, use: str, index: int) -> torch.Generator:
    """A generator for draw ``index`` (a step, an epoch) of ``use`` (one of STREAMS) in the run of ``seed``."""
    state = np.random.SeedSequence([seed, STREAMS.index(use), index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def step_generator(seed: int, step: int) -> torch.Generator:
    return stream_generator(seed, "step", step)


def batch_loader(batches: StepBatches, first_step: int, end_step: int, workers: int, pin_memory: bool,
                 prefetch: int = 4) -> torch.utils.data.DataLoader:
    """The batches of steps ``first_step`` to ``end_step`` (exclusive), in order; with ``workers`` processes
    reading ahead up to ``prefetch`` batches each (``fastdit.distributed.worker_options``)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(first_step, end_step),
                                       pin_memory=pin_memory, **distributed.worker_options(workers, prefetch))


def load_digits(image_size: int = 16) -> TensorData:
    """scikit-learn's bundled digits (1,797 8x8 images with 17 grey levels, ten classes; no
    download), upscaled bilinearly to ``image_size`` and mapped to [-1, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return TensorData(images * 2 - 1, torch.from_numpy(digits.target), 10, "sklearn digits")


def class_folder_files(directory: str, flag: str = "data") -> tuple[list[tuple[str, int]], int]:
    """An ImageFolder layout (one sub-directory per class, sorted names = class ids): its files as
    [(path, label)] in order, and the number of classes. A class folder without files is an error naming it
    (it would be a class without images, whose id still counts). ``flag`` names the argument in errors."""
    if not os.path.isdir(directory):
        raise ValueError(f"{flag}: {directory!r} is not a directory of class folders")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    per_class = [[path for path in sorted(glob.glob(os.path.join(directory, name, "*"))) if os.path.isfile(path)]
                 for name in classes]
    if not any(per_class):
        raise ValueError(f"{flag}: found no files in class folders under {directory!r}")
    empty = [name for name, paths in zip(classes, per_class) if not paths]
    if empty:
        raise ValueError(f"{flag}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:3])}"
                         f"{', ...' if len(empty) > 3 else ''} under {directory!r} hold{'' if len(empty) > 1 else 's'} "
                         "no files: every class needs images (remove the empty folder or add its images)")
    return [(path, label) for label, paths in enumerate(per_class) for path in paths], len(classes)


def load_image_folder(directory: str, image_size: int) -> TensorData:
    """``class_folder_files``' images, preprocessed as the release does (``center_crop_arr``), in [-1, 1]. A
    file that is not a readable image is an error naming it: skipping it would train on another data set."""
    from PIL import Image

    files, num_classes = class_folder_files(directory)
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                images.append(center_crop_arr(image, image_size))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"data: {path}: cannot read it as an image ({error}); remove it from the class "
                             "folder") from None
    # From uint8 pixels: always finite, unlike latent shards (check_finite scans those).
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return TensorData(pixels, torch.tensor([label for _, label in files]), num_classes, f"images in {directory}")


# Two epochs' orders: a batch no larger than the set spans at most two. Each is N int64 (8 bytes a
# sample: 10 MB for ImageNet's 1.28M), kept per process and per worker; drawing it again every step
# would cost a randperm of N per step.
@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=stream_generator(seed, "epoch", epoch))


def global_batch_indices(seed: int, step: int, batch_size: int, size: int) -> torch.Tensor:
    """Indices of the ``step``-th global batch: consecutive slices of a fresh permutation per epoch."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // size, positions % size
    indices = torch.empty(batch_size, dtype=torch.int64)
    for epoch in epochs.unique().tolist():
        where = epochs == epoch
        indices[where] = _epoch_order(seed, epoch, size)[offsets[where]]
    return indices

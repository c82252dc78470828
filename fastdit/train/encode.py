"""Precompute (`fastdit encode`, ``fastdit.cli.encode``) VAE latents of an image folder for training.

DiT trains on latents of center crops (``preprocess.center_crop_arr``) with random horizontal flips.
Both flips of every image are encoded once here, so training reads latents and never runs the VAE.
The output is the memory-mappable shard folder of ``fastdit.train.shards``.

Shard ``k`` holds images ``k * shard_size`` to ``(k + 1) * shard_size`` of the sorted file list, encoded
in batches that start at the shard's first image: its bytes are a function of the file list and the
settings alone, whatever the number of processes (torchrun splits the shards between them) or of
DataLoader workers (which decode and preprocess the JPEGs), and whether the run was resumed. A killed
run, rerun with the same command, keeps the shards whose record and files agree and encodes the rest.
"""
import contextlib
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdit import distributed
from fastdit.io import check_owned_folder, exclusive_lock, mark_owned_folder, remove_stale_temporaries
from fastdit.models.vae import VAE
from fastdit.train import shards
from fastdit.train.preprocess import center_crop_arr

LOCK = ".encode.lock"


class ImageFiles(torch.utils.data.Dataset):
    """[(path, label)] as preprocessed uint8 (H, W, 3) images. An unreadable file is returned as its
    error message, so that the main process can name it in one line (a worker's exception would come
    back wrapped in a multi-line traceback)."""

    def __init__(self, files, image_size):
        self.files, self.image_size = files, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image

        path, label = self.files[index]
        try:
            with Image.open(path) as image:
                return torch.from_numpy(center_crop_arr(image, self.image_size)), label, index, None
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return None, label, index, f"{path}: cannot read it as an image ({error})"


def collate(items):
    errors = [error for *_, error in items if error is not None]
    images = None if errors else torch.stack([image for image, *_ in items])
    return images, torch.tensor([label for _, label, _, _ in items]), [index for _, _, index, _ in items], errors


def encode_settings(files, num_classes, vae: VAE, image_size, batch_size, shard_size, latent_dtype) -> dict:
    """What a shard's bytes depend on; a resumed run must match it. Files are named relative to the
    folder (class/name), so the same folder under another path resumes; their sizes are part of it, so that
    other images under the same names (a folder replaced meanwhile) do not."""
    listing = hashlib.sha256(json.dumps(
        [[os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path)), label, os.path.getsize(path)]
         for path, label in files]).encode()).hexdigest()
    weights = hashlib.sha256(f"{vae.scale} {vae.shift}".encode())
    for name, tensor in sorted(vae.autoencoder.state_dict().items()):
        weights.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"images": len(files), "files_sha256": listing, "num_classes": num_classes,
            "vae_sha256": weights.hexdigest(), "vae_dtype": str(vae.dtype).removeprefix("torch."),
            "image_size": image_size, "batch_size": batch_size, "shard_size": shard_size, "latent_dtype": latent_dtype}


def _check_folder(out, settings, num_shards):
    """Refuse a folder that holds another encode's output (resuming it would mix two data sets)."""
    if any(name.startswith("shard-") and name.endswith(".npz") for name in os.listdir(out)):
        raise ValueError(f"--out: {out!r} holds shards of the old .npz format; choose another folder")
    manifest = shards.read_manifest(out)
    found = [manifest["settings"]] if manifest else []
    found += [record["settings"] for index in range(num_shards) if (record := shards.read_record(out, index))]
    for other in found:
        if other != settings:
            differ = ", ".join(f"{key} {other.get(key)!r} (now {value!r})" for key, value in settings.items()
                               if other.get(key) != value)
            raise ValueError(f"--out: {out!r} holds shards of a different encode (they differ in {differ}); "
                             "choose another folder or remove it")


def encode_files(files, num_classes, vae: VAE, out, image_size, batch_size, shard_size, latent_dtype="fp16",
                 workers=0, prefetch=2, process: distributed.Process | None = None, progress=True) -> dict:
    """Encode ``files`` [(path, label)] (``fastdit.train.data.class_folder_files``), both flips of each
    image, into the shard folder ``out`` (resuming one this same command left unfinished); in a torchrun
    group each process encodes its share of the shards and rank 0 writes the manifest. Returns the number
    of shards encoded now, kept from before, and in all."""
    process = process or distributed.Process(0, 1, 0, vae.device, None)
    if image_size % vae.downsampling:
        raise ValueError(f"--image-size: expected a multiple of the VAE's downsampling {vae.downsampling}, "
                         f"got {image_size}")
    if latent_dtype not in shards.LATENT_DTYPES:
        raise ValueError(f"--latent-dtype: expected one of {', '.join(shards.LATENT_DTYPES)}, got {latent_dtype!r}")
    settings = encode_settings(files, num_classes, vae, image_size, batch_size, shard_size, latent_dtype)
    num_shards = -(-len(files) // shard_size)
    with contextlib.ExitStack() as stack:
        def claim():
            if process.is_main:
                check_owned_folder(out, "encode", ignore=(LOCK,), legacy=shards.is_shard_folder)
                os.makedirs(out, exist_ok=True)
                stack.enter_context(exclusive_lock(os.path.join(out, LOCK), f"--out {out}"))
                mark_owned_folder(out, "encode")
                remove_stale_temporaries(out)
                _check_folder(out, settings, num_shards)

        # A barrier as well: no rank writes before rank 0 holds the folder and has cleared its leftovers.
        distributed.fail_together(claim, process)
        distributed.check_shared_folder(out, process, "--out")
        # On several machines each lists its own --data: rank 0 waits for records of its settings only.
        distributed.fail_together(lambda: _same_as_main(settings, process), process)
        mine = distributed.shard(num_shards, process.rank, process.world_size)
        # A record is written after its shard's files; sizes and checksums catch a file damaged since, which
        # is encoded again (said in one line: a damaged disk or copy is worth knowing about).
        kept = []
        for index in mine:
            if (record := shards.read_record(out, index)) is None or record["settings"] != settings:
                continue
            if problem := shards.shard_problem(out, record, checksums=True):
                print(f"warning: --out: {problem}; encoding shard {index} again", file=sys.stderr, flush=True)
                continue
            kept.append(index)
        todo = [index for index in mine if index not in kept]
        try:
            _encode_shards(files, todo, vae, out, settings, workers, prefetch, progress and process.is_main)
        except (ValueError, OSError) as error:
            # This rank's own failure, which the others do not share: the CLI prints it on any rank.
            error.rank = process.rank
            raise
        if process.is_main:
            records = _wait_for_records(out, num_shards, settings)
            shards.write_manifest(out, records, num_classes, settings)
    return {"encoded": len(todo), "kept": len(kept), "shards": num_shards}


def _same_as_main(settings, process):
    main = distributed.broadcast_from_main(settings, process)
    if main != settings:
        differ = ", ".join(f"{key} {value!r} (rank 0: {main.get(key)!r})" for key, value in settings.items()
                           if main.get(key) != value)
        raise ValueError(f"--data: rank {process.rank} sees another encode than rank 0 ({differ}); every machine must "
                         "see the same image folder and VAE")


def _encode_shards(files, todo, vae, out, settings, workers, prefetch, progress):
    image_size, batch_size, shard_size = settings["image_size"], settings["batch_size"], settings["shard_size"]
    ranges = {index: range(index * shard_size, min((index + 1) * shard_size, len(files))) for index in todo}
    # Batches never cross a shard's start: the same batches, so the same bytes, however the run is split.
    batches = [list(part[start:start + batch_size]) for part in ranges.values()
               for start in range(0, len(part), batch_size)]
    # Workers from a fork server, that die with this process (forking after CUDA is initialised is unsafe too).
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, image_size), batch_sampler=batches, collate_fn=collate,
        pin_memory=vae.device.type == "cuda", **distributed.worker_options(workers, prefetch))
    pending = {field: [] for field in shards.FIELDS}
    with tqdm(total=sum(map(len, ranges.values())), desc="encoding", unit="img", dynamic_ncols=True,
              disable=not progress) as bar:
        for images, labels, indices, errors in loader:
            if errors:
                raise ValueError(f"--data: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
            images = images.to(vae.device, non_blocking=True)
            # Both flips in one call: mirroring the width axis of (N, H, W, C).
            latents = vae.encode(torch.cat([images, images.flip(2)])).float()
            bad = ~torch.isfinite(latents.flatten(1)).all(dim=1)
            if bool(bad.any()):
                path = files[indices[int(bad.nonzero()[0]) % len(indices)]][0]
                raise ValueError(f"--vae: the latents of {path} are not finite; the VAE (or its dtype) is broken")
            latents = latents.cpu().numpy()
            pending["latents"].append(latents[:len(indices)])
            pending["flipped"].append(latents[len(indices):])
            pending["labels"].append(labels.numpy())
            bar.update(len(indices))
            shard = indices[-1] // shard_size
            if indices[-1] == ranges[shard][-1]:
                arrays = {field: np.concatenate(parts) for field, parts in pending.items()}
                if settings["latent_dtype"] == "fp16" and max(np.abs(arrays[field]).max(initial=0)
                                                              for field in shards.LATENT_FIELDS) > 65504:
                    raise ValueError("--latent-dtype fp16: the latents exceed fp16's range (65504); use bf16 or fp32")
                shards.write_shard(out, shard, arrays, settings["latent_dtype"], settings)
                pending = {field: [] for field in shards.FIELDS}


def _wait_for_records(out, num_shards, settings, poll_s=1.0) -> list[dict]:
    """Every shard's record, once the other ranks have written theirs. The files, not a collective,
    tell: the ranks finish at different times, and a barrier would time out on a long encode (NCCL's
    default is ten minutes). If a rank fails, torchrun stops this one too."""
    while True:
        records = [shards.read_record(out, index) for index in range(num_shards)]
        if all(record is not None and record["settings"] == settings for record in records):
            return records
        time.sleep(poll_s)

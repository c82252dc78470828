"""Features of every image of a source, streamed from disk, split over torchrun ranks, resumable.

The images are cut into chunks of ``CHUNK`` consecutive images, whatever the number of ranks; each rank takes a
contiguous run of chunks (``distributed.shard``). DataLoader workers read the images batch by batch (a batch never
spans two chunks), the network maps them to features, and each finished chunk is written at once, atomically, as a
feature shard ``<first index>.npz`` in the work folder. A shard records the extractor's identity and the sha256
of its chunk's image bytes; a rerun after a kill reads each finished shard's images again, checks they are the
images the shard came from, and runs the network only on the chunks that have no shard. Memory does not grow
with the number of images: one chunk's features are held at a time.

Once every rank is done, rank 0 reads the shards in image order and reduces them in float64 (``Summary``): the
same numbers from any number of ranks, and from a resumed run.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil

import numpy as np
import torch

from fastdit.evaluation.inputs import ImageSource, InputError
from fastdit.evaluation.metrics import InceptionScore, Moments
from fastdit.io import atomic_path, exclusive_lock, remove_stale_temporaries
from fastdit import distributed

CHUNK = 1024
LOCK = ".lock"
_SHARD = re.compile(r"^(\d{7,})\.npz$")


class _Images(torch.utils.data.Dataset):
    """One batch per item: the DataLoader's workers each read whole batches from the source."""

    def __init__(self, source: ImageSource, batches: list[range]):
        self.source, self.batches = source, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        batch = self.batches[index]
        return torch.from_numpy(self.source.read(batch.start, batch.stop))


@dataclasses.dataclass
class Summary:
    """What the metrics need of one set of images: float64 moments per feature, the IS sums, and the pool
    features themselves (precision/recall compares every pair)."""

    count: int
    moments: dict
    inception_score: InceptionScore | None
    pool: np.ndarray


def chunks(count: int, size=CHUNK) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def shard_path(folder, chunk: range) -> str:
    return os.path.join(folder, f"{chunk.start:07d}.npz")


def _images_digest(images: np.ndarray, digest=None):
    digest = digest or hashlib.sha256()
    digest.update(np.ascontiguousarray(images).data)
    return digest


def _shard_record(path) -> dict:
    with np.load(path, allow_pickle=False) as shard:
        return {name: shard[name] for name in shard.files}


def _check_shard(path, source: ImageSource, chunk: range, identity: str) -> None:
    """Raise unless the shard at ``path`` holds the features of ``chunk`` of ``source`` by this extractor."""
    try:
        record = _shard_record(path)
        recorded = json.loads(bytes(record["identity"]).decode())
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise InputError(f"the feature shard {path} cannot be read ({error}); pass --restart to extract again") \
            from None
    images = _images_digest(source.read(chunk.start, chunk.stop)).hexdigest()
    expected = {"extractor": identity, "start": chunk.start, "stop": chunk.stop, "images": images}
    different = [name for name in expected if recorded.get(name) != expected[name]]
    if different:
        raise InputError(f"the finished feature shard {path} came from other inputs (its {', '.join(different)} "
                         f"differ from {source.description}'s): pass --restart to extract again")


def _write_shard(path, chunk: range, identity: str, digest, features: dict) -> None:
    record = {"extractor": identity, "start": chunk.start, "stop": chunk.stop, "images": digest.hexdigest()}
    arrays = {name: np.concatenate(parts) for name, parts in features.items()}
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, identity=np.frombuffer(json.dumps(record).encode(), np.uint8), **arrays)
        file.flush()
        os.fsync(file.fileno())


def _extract_mine(source, extractor, folder, process, batch_size, workers, chunk_size):
    every = chunks(len(source), chunk_size)
    mine = [every[index] for index in distributed.shard(len(every), process.rank, process.world_size)]
    pending = []
    for chunk in mine:
        if os.path.exists(shard_path(folder, chunk)):
            _check_shard(shard_path(folder, chunk), source, chunk, extractor.identity)
        else:
            pending.append(chunk)
    batches = [range(start, min(start + batch_size, chunk.stop)) for chunk in pending
               for start in range(chunk.start, chunk.stop, batch_size)]
    # Workers that die with this process, and inherit none of its descriptors (the work folder's lock).
    loader = torch.utils.data.DataLoader(_Images(source, batches), batch_size=None,
                                         **distributed.worker_options(workers, prefetch=2))
    chunk_iter = iter(pending)
    chunk, features, digest = None, {}, None
    for batch, images in zip(batches, loader):
        if chunk is None:
            chunk, features, digest = next(chunk_iter), {}, hashlib.sha256()
        _images_digest(images.numpy(), digest)
        with torch.no_grad():
            outputs = extractor(images.to(process.device))
        for name, value in outputs.items():
            features.setdefault(name, []).append(value.float().cpu().numpy())
        if batch.stop == chunk.stop:
            _write_shard(shard_path(folder, chunk), chunk, extractor.identity, digest, features)
            chunk = None


def summarise(folder, count: int, chunk_size=CHUNK) -> Summary:
    """Rank 0's float64 reduction of the shards of ``count`` images, in image order."""
    moments, score, pool = {}, None, []
    for chunk in chunks(count, chunk_size):
        record = _shard_record(shard_path(folder, chunk))
        for name in ("pool", "spatial"):
            if name in record:
                moments.setdefault(name, Moments()).add(record[name])
        if "logits" in record:
            score = score or InceptionScore()
            score.add(record["logits"], chunk.start)
        pool.append(record["pool"])
    return Summary(count, moments, score, np.concatenate(pool))


def extract(source: ImageSource, extractor, folder, process, batch_size=64, workers=2, restart=False,
            chunk_size=CHUNK) -> Summary | None:
    """Features of ``source`` by ``extractor`` through the shards in ``folder`` (made if missing, locked by rank 0,
    removed once summarised); rank 0 gets the ``Summary``, other ranks None. Every rank calls it."""
    with contextlib.ExitStack() as held:
        def prepare():
            if not process.is_main:
                return
            os.makedirs(folder, exist_ok=True)
            held.enter_context(exclusive_lock(os.path.join(folder, LOCK), f"the feature folder {folder}"))
            remove_stale_temporaries(folder)
            names = [name for name in os.listdir(folder) if name != LOCK]
            unknown = [name for name in names if not _SHARD.match(name)]
            if unknown:
                raise InputError(f"the feature folder {folder} holds files an evaluation does not write "
                                 f"({', '.join(sorted(unknown)[:3])}): remove them or the folder")
            for name in names if restart else ():
                os.remove(os.path.join(folder, name))

        distributed.fail_together(prepare, process)
        distributed.check_shared_folder(folder, process, "the feature folder")
        distributed.fail_together(lambda: _extract_mine(source, extractor, folder, process, batch_size, workers,
                                                                chunk_size),
                                  process)
        summary = distributed.fail_together(lambda: summarise(folder, len(source), chunk_size) if process.is_main else None,
                                            process)
        if process.is_main:
            shutil.rmtree(folder)
    return summary

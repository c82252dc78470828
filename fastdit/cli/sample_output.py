"""`fastdit sample --out`: a folder written as a whole, and a run that resumes after a kill.

A run's --out holds exactly that run's files, and a run that fails or is killed at any point leaves the
previous output whole:

- the run takes an exclusive lock, the hidden file ``.<name>.lock`` beside --out (beside it, not in it:
  it must outlive the swap below), before loading anything; a second run into the same --out stops at
  once, naming the holder's pid;
- it works in a staging folder beside --out, ``.<name>.staging-<key>``, where ``<key>`` is a digest of
  the run's identity: everything that changes the images (the weights as loaded, the VAE's weights, the
  labels, sampler, steps, guidance, seed, the sampler conventions, the feature cache, batch size, the
  parallel mode, dtype, device type, kernels, attention backend, compile and CUDA graphs, fastdit's and
  torch's versions), recorded in full in its ``resume.json``;
- every batch goes to disk as soon as it is sampled, as ``batches/<first image index>.npy``, written by
  the rank that sampled it (atomic: a batch file is whole or absent), so memory does not grow with
  --num-samples and no images travel between ranks;
- once all batches are on disk, the outputs are written to ``output/`` in the staging folder: the PNGs
  (--save-images, spread over the ranks), then samples.npz streamed batch by batch, grid.png from the
  first images, run.json last; ``output/`` is then swapped in for --out with one atomic
  ``renameat2(RENAME_EXCHANGE)`` (``fastdit.io.replace_directory``; where the OS or filesystem lacks it,
  two renames, and the next run puts back an output a kill between them moved aside), and the staging
  folder is removed;
- a killed (or failed, or interrupted) run keeps its staging folder when it holds finished batches. The
  same command run again finds it by its key, checks ``resume.json``, and samples only the missing
  batches: every image's noise depends only on (seed, image index), so the result is the same, bit for
  bit, as an uninterrupted run's. A different command refuses to discard another command's partial run,
  naming what differs, unless given --restart; staging folders without finished batches, without a
  readable ``resume.json``, or whose run did finish (--out's run.json carries their key) are removed;
- an existing --out is replaced only when it holds nothing but a sample run's files (run.json,
  samples.npz, grid.png, images/*.png): any other folder is refused, never deleted.

Under torchrun every rank writes its batch files into the same staging folder, so --out must be on a
filesystem every rank sees (a shared one for several machines; each rank checks before sampling).
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch

from fastdit.io import (
    exclusive_lock,
    remove_stale_temporaries,
    replace_directory,
    restore_replaced,
    write_npy_atomic,
    write_text_atomic,
)

SAMPLE_OUTPUTS = ("grid.png", "images", "run.json", "samples.npz")  # what a run writes in --out
RESUME_FILE = "resume.json"
STAGING_FORMAT = 2  # resume.json's layout (2: batch checksums): a staging folder of another format is not resumed
CHECKSUM_SUFFIX = ".sha256"  # beside each batch file: the sha256 of its bytes, recorded when it was written
_BATCH_RECORD = re.compile(r"^(\d{7,})\.npy\.sha256$")  # a finished batch's record (CHECKSUM_SUFFIX)
_PNG_NAME = re.compile(r"^\d{6,}_class\d+\.png$")  # sample.png_path's names


def _foreign_files(path) -> list[str]:
    """What the existing --out ``path`` holds that no sample run wrote: anything but ``SAMPLE_OUTPUTS``, PNGs
    in images/ not named as a run names them, and every file of a folder without a sample run's run.json."""
    names = sorted(os.listdir(path))
    foreign = [name for name in names if name not in SAMPLE_OUTPUTS]
    images_dir = os.path.join(path, "images")
    if os.path.isdir(images_dir):
        foreign += [f"images/{name}" for name in sorted(os.listdir(images_dir)) if not _PNG_NAME.match(name)]
    if names and not foreign and "identity" not in _read_json(os.path.join(path, "run.json")):
        foreign = [name if name != "run.json" else "run.json (not a sample run's)" for name in names]
    return foreign


def output_path(out) -> str:
    """--out as an absolute path with symbolic links resolved (the swap replaces the folder, not a link)."""
    if not out or not out.strip():
        raise ValueError(f"--out: expected a folder path, got {out!r}")
    path = os.path.realpath(out)
    if os.path.dirname(path) == path:
        raise ValueError(f"--out {out}: a run replaces its --out as a whole; the filesystem root cannot be replaced")
    return path


def check_output(out) -> str:
    """Raise unless ``out`` can be this run's output folder: a new or empty folder, or one holding only an
    earlier sample run's files (its run.json, and images named as a run names them), whose parent this process
    can write in, and not a mount point (a run swaps its --out whole, which a mount point cannot be). Returns
    its path; creates nothing."""
    path = output_path(out)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise OSError(f"--out {out}: {path} is a file, not a directory")
        if os.path.ismount(path):
            raise ValueError(f"--out {out}: is a mount point, and a run replaces its --out as a whole by renaming a "
                             "folder onto it: pass a folder inside it")
        foreign = _foreign_files(path)
        if foreign:
            raise ValueError(f"--out {out}: holds files that no sample run wrote ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}), and a run replaces its --out as a whole: "
                             "choose a new or empty folder")
    existing = os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OSError(f"--out {out}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OSError(f"--out {out}: cannot write in {existing} ({error.strerror or error})") from None
    return path


@contextlib.contextmanager
def locked_output(out):
    """Check --out and hold its lock for the block; yields --out's path."""
    path = check_output(out)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    with exclusive_lock(os.path.join(parent, f".{name}.lock"), f"--out {out}"):
        yield path


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def recorded(settings) -> dict:
    """``sampling_settings`` as JSON: the cache policy as its method and settings (None: off)."""
    cache = settings["cache"]
    return {**settings, "cache": None if cache is None else {"method": cache.method, **dataclasses.asdict(cache)}}


def weights_digest(module) -> str:
    """sha256 of a module's tensors (names, dtypes, shapes and bytes) as loaded."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Staging:
    """A run's staging folder: its batch files, and ``output/``, the folder that becomes --out."""

    path: str
    key: str

    @property
    def output(self) -> str:
        return os.path.join(self.path, "output")

    @property
    def batches(self) -> str:
        return os.path.join(self.path, "batches")

    def batch_path(self, start) -> str:
        return os.path.join(self.batches, f"{start:07d}.npy")

    def finished_batches(self) -> set[int]:
        """The first image index of every finished batch (its file and its record on disk)."""
        if not os.path.isdir(self.batches):
            return set()
        return {int(match[1]) for match in map(_BATCH_RECORD.match, os.listdir(self.batches)) if match}

    def write_batch(self, start, samples: np.ndarray) -> None:
        """The batch file, then the sha256 it is read back against: the record makes the batch finished (a kill
        between the two leaves a batch without one, which is sampled again)."""
        data = write_npy_atomic(self.batch_path(start), samples)
        write_text_atomic(self.batch_path(start) + CHECKSUM_SUFFIX, hashlib.sha256(data).hexdigest() + "\n")

    def batch_problem(self, start) -> tuple[str | None, bytes]:
        """(why the batch file of ``start`` is not what was written, or None; its bytes)."""
        path = self.batch_path(start)
        try:
            with open(path, "rb") as file:
                data = file.read()
            with open(path + CHECKSUM_SUFFIX) as file:
                recorded = file.read().strip()
        except OSError as error:
            return f"cannot read {error.filename} ({error.strerror})", b""
        if hashlib.sha256(data).hexdigest() != recorded:
            return (f"the batch file {path} is damaged (its sha256 differs from the one recorded when it was "
                    "written)"), data
        return None, data

    def read_batch(self, batch: range) -> np.ndarray:
        path = self.batch_path(batch.start)
        problem, data = self.batch_problem(batch.start)
        if problem is not None:
            raise ValueError(f"{problem}; pass --restart to sample the run again from scratch")
        samples = np.load(io.BytesIO(data), allow_pickle=False)
        if len(samples) != len(batch):
            raise ValueError(f"the batch file {path} holds {len(samples)} samples, expected {len(batch)}; pass "
                             "--restart to sample the run again from scratch")
        return samples

    def drop_damaged_batches(self) -> None:
        """Remove, with a warning each, the finished batches that differ from what was written: they are
        sampled again."""
        for start in sorted(self.finished_batches()):
            problem, _ = self.batch_problem(start)
            if problem is not None:
                print(f"warning: {problem}; sampling it again", file=sys.stderr, flush=True)
                for path in (self.batch_path(start) + CHECKSUM_SUFFIX, self.batch_path(start)):  # record first
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)

    def swap_in(self, path) -> None:
        """Make the complete ``output/`` --out (``path``) in one atomic step, then remove the folder."""
        replace_directory(self.output, path)
        shutil.rmtree(self.path)

    def check_visible(self, rank) -> None:
        """Raise unless this process sees the folder that rank 0 made (ranks on machines without a shared
        filesystem do not)."""
        if not os.path.isfile(os.path.join(self.path, RESUME_FILE)):
            raise OSError(f"--out: rank {rank} cannot see the staging folder {self.path} that rank 0 made; under "
                          "torchrun on several machines --out must be on a filesystem they all share")


@contextlib.contextmanager
def staging_folder(path, identity: dict, restart=False):
    """Under --out's lock (``locked_output``): yield this run's ``Staging``, resumed when the same command
    left one, else new. On the way out it is removed unless it holds finished batches (then the same
    command resumes it). Raises when another command's partial run is in the way, unless ``restart``."""
    parent, name = os.path.split(path)
    key = identity_key(identity)
    restore_replaced(path)
    leftover = re.compile(rf"^\.{re.escape(name)}\.staging-[a-z0-9_]+$")
    for entry in sorted(os.scandir(parent), key=lambda entry: entry.name):
        if leftover.match(entry.name) and entry.is_dir(follow_symlinks=False):
            _clear_leftover(entry.path, path, key, identity, restart)
    staging = Staging(os.path.join(parent, f".{name}.staging-{key}"), key)
    try:
        if os.path.isdir(staging.path):
            for folder in (staging.batches, staging.output, os.path.join(staging.output, "images")):
                remove_stale_temporaries(folder)
            staging.drop_damaged_batches()
        else:
            os.mkdir(staging.path)
            os.makedirs(staging.batches)
            os.makedirs(staging.output)
            record = {"format": STAGING_FORMAT, "key": key, "identity": identity}
            write_text_atomic(os.path.join(staging.path, RESUME_FILE), json.dumps(record, indent=2) + "\n")
        yield staging
    finally:
        if os.path.isdir(staging.path) and not staging.finished_batches():
            shutil.rmtree(staging.path, ignore_errors=True)


def kept(args) -> str:
    """What a stopped run into ``args.out`` kept, for the line that says so: its finished batches."""
    path = output_path(args.out)
    parent, name = os.path.split(path)
    staging = re.compile(rf"^\.{re.escape(name)}\.staging-[a-z0-9_]+$")
    folders = [os.path.join(parent, entry) for entry in sorted(os.listdir(parent)) if staging.match(entry)]
    done = sum(len(Staging(folder, "").finished_batches()) for folder in folders)
    if not done:
        return "no finished batch"
    return f"{done} finished batch{'es' if done > 1 else ''} in {', '.join(folders)}"


def _clear_leftover(folder, path, key, identity, restart):
    """Remove a staging folder that cannot or need not be resumed; keep this command's partial run;
    refuse to remove another command's unless ``restart``."""
    record = _read_json(os.path.join(folder, RESUME_FILE))
    theirs = record.get("key") if record.get("format") == STAGING_FORMAT else None
    done = len(Staging(folder, theirs).finished_batches()) if theirs else 0
    finished = theirs is not None and _read_json(os.path.join(path, "run.json")).get("identity") == theirs
    if theirs == key and done and not finished and not restart:
        return
    if theirs and done and not finished and not restart:
        other = record.get("identity", {})
        differences = [f"{name} ({other.get(name)!r} there, {identity.get(name)!r} here)"
                       for name in sorted(set(other) | set(identity)) if other.get(name) != identity.get(name)]
        total = -(-other.get("num_samples", 0) // max(other.get("batch_size", 1), 1))
        raise ValueError(f"--out {path}: {folder} holds the partial output of a killed run of another command "
                         f"({done} of {total} batches done; it differs in {', '.join(differences[:3])}"
                         f"{', ...' if len(differences) > 3 else ''}): rerun that command to finish it, or pass "
                         "--restart to discard it")
    shutil.rmtree(folder)


def _read_json(path) -> dict:
    try:
        with open(path) as file:
            record = json.load(file)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}

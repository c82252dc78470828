"""A training run's folder: checkpoints that carry a record of what was saved, and a log that a
killed run can continue.

A kill can stop a run anywhere. ``fastdit.io.atomic_path`` keeps every file whole or absent (its
leftover temporaries are cleared when the next run has locked the folder); what it cannot catch, a
checkpoint damaged later (a full disk, a bad copy), the size and sha256 recorded beside each
checkpoint can: the resume passes over such a checkpoint for the newest sound one. Appending a log
line is not atomic: a torn last line is dropped, and the steps past the resumed checkpoint too, as
the resume logs them again.
"""
import hashlib
import json
import os
import sys

import torch

from fastdit.io import atomic_path, write_text_atomic
from fastdit.models.config import load_failure

LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def is_legacy_run_folder(path, names) -> bool:
    """Whether the unmarked folder ``path``, holding ``names``, is a training run folder of a fastdit from
    before run folders were marked: nothing but what a run writes, and a config.json of a training run."""
    if not set(names) <= {CONFIG_FILE, LOG_FILE, CHECKPOINTS, "model"} or CONFIG_FILE not in names:
        return False
    try:
        with open(os.path.join(path, CONFIG_FILE)) as file:
            config = json.load(file)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"global_batch_size", "ema_decay", "ckpt_every"} <= set(config)


class DamagedCheckpoint(ValueError):
    """A checkpoint that differs from what was saved, or cannot be read."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def append_log(path, record):
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")


def drop_log_after(path, step):
    """Forget log records past ``step``: a killed run logged steps that its resume repeats. A torn last
    line (a kill during its write) is dropped with a warning; a bad line before the last is an error."""
    if not os.path.exists(path):
        return
    with open(path, errors="replace") as log:
        lines = [(number, line) for number, line in enumerate(log, start=1) if line.strip()]
    kept = []
    for index, (number, line) in enumerate(lines):
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as error:
            if index < len(lines) - 1:
                raise ValueError(f"{path} line {number} is not a training record ({type(error).__name__}: "
                                 f"{error}); fix or remove that line to resume") from None
            warn(f"{path} line {number} is torn (the run was stopped while writing it); dropped it")
            continue
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text_atomic(path, "".join(kept))


def record_path(checkpoint_path):
    """Where the size and sha256 of ``checkpoint_path`` are recorded when it is saved."""
    return checkpoint_path + ".json"


class _HashingWriter:
    """A file that hashes the bytes passing through it: the record costs no second read of a checkpoint."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0
        self.error = None  # the write's own error, which torch.save's zip writer hides behind its own

    def write(self, data):
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def write_checkpoint(state, path):
    """``torch.save(state)`` to ``path`` atomically, with its record."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            writer = _HashingWriter(file)
            try:
                torch.save(state, writer)
            except RuntimeError:
                # A failed write (a full disk) surfaces as "[enforce fail at inline_container.cc] unexpected pos":
                # raise the write's error instead, which atomic_path names with the checkpoint's path.
                if writer.error is None:
                    raise
                raise writer.error from None
            file.flush()
            os.fsync(file.fileno())
        # Recorded before the checkpoint is renamed into place: a kill between the two leaves a record that
        # matches no checkpoint (one the resume passes over), never a new checkpoint without its record.
        record = {"size": writer.size, "sha256": writer.sha256.hexdigest()}
        write_text_atomic(record_path(path), json.dumps(record) + "\n")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path) -> dict:
    """A training checkpoint, checked against the size and sha256 recorded when it was saved (an older
    run's checkpoint has no record: it must only load). Raises ``DamagedCheckpoint``."""
    if os.path.exists(record_path(path)):
        try:
            with open(record_path(path)) as file:
                record = json.load(file)
            size, sha256 = int(record["size"]), str(record["sha256"])
        except (ValueError, KeyError, TypeError) as error:
            raise DamagedCheckpoint(f"checkpoint {path}: its record {record_path(path)} cannot be read "
                                    f"({type(error).__name__})") from None
        if os.path.getsize(path) != size:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {os.path.getsize(path)} bytes, {size} when saved")
        if _sha256(path) != sha256:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: its sha256 differs from the one recorded when "
                                    "it was saved")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails as RuntimeError, EOFError, UnpicklingError, ...
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({load_failure(error)})") from None


def check_same_inputs(path, state, data, data_identity: dict, model_config: dict) -> None:
    """Raise unless the checkpoint ``state`` (read from ``path``) was trained on the data that --data ``data``
    holds now (``data_identity``: what it resolved to and held) and saved the model this run builds, naming
    what differs. Older checkpoints record neither: they are not checked."""
    for what, recorded, now in (("data", state.get("data_identity"), data_identity),
                                ("model", state.get("model_config"), model_config)):
        if recorded is None or recorded == now:
            continue
        differences = ", ".join(f"{name} {recorded.get(name)!r} then, {value!r} now"
                                for name, value in now.items() if recorded.get(name) != value)
        if what == "data":
            raise ValueError(f"resume: {path} was trained on other data than --data {data} holds now ({differences}); "
                             "use another --out to start a new run, or restore the data")
        raise ValueError(f"resume: {path} holds another model than this run builds ({differences}); use another "
                         "--out to start a new run")


def checkpoint_paths(directory):
    """The checkpoints (``<step>.pt``) in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(name for name in os.listdir(directory) if name.endswith(".pt") and name[:-3].isdigit())
    return [os.path.join(directory, name) for name in names]


def newest_sound_checkpoint(directory, warnings=True):
    """(path, state) of the newest checkpoint in ``directory`` that matches its record and loads, with a
    warning for each damaged one passed over; (None, None) when there is none at all."""
    damaged = []
    for path in reversed(checkpoint_paths(directory)):
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpoint as error:
            if warnings:
                warn(f"{error}; trying an older checkpoint")
            damaged.append(os.path.basename(path))
    if damaged:
        raise DamagedCheckpoint(f"resume: every checkpoint in {directory} is damaged ({', '.join(damaged)}); move "
                                "them away to start the run over")
    return None, None

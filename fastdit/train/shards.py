"""The latent shards ``fastdit encode`` writes, and a reader that memory-maps them.

A shard folder holds, per shard ``k``, one uncompressed ``.npy`` file per field, which
``np.load(mmap_mode="r")`` maps without reading it::

    shard-00000.latents.npy   (n, C, h, w)  the image's latents, in the encode's --latent-dtype
    shard-00000.flipped.npy   (n, C, h, w)  the mirrored image's latents (not the latents' mirror)
    shard-00000.labels.npy    (n,) int64
    shard-00000.json          the shard's record: counts, dtypes, shapes, byte sizes and sha256 of its
                              files, and the encode's settings; written after its files, so a record
                              means a finished shard
    manifest.json             every record and the totals, written last by ``fastdit encode``

Latents are stored as ``fp16`` (the default), ``bf16`` (as its raw uint16 bits: numpy has no bfloat16)
or ``fp32``; the reader hands out float32. Folders of the format before this one (``shard-*.npz``) are
read too: memory-mapped where the zip stores its members uncompressed, as ``np.savez`` does.
"""
import hashlib
import json
import os
import re
import zipfile

import numpy as np

from fastdit.io import write_npy_atomic, write_text_atomic

FORMAT = "fastdit-latent-shards"
VERSION = 1
MANIFEST = "manifest.json"
FIELDS = ("latents", "flipped", "labels")
LATENT_FIELDS = ("latents", "flipped")
# --latent-dtype: the numpy dtype each is stored as. bf16 is kept as its upper 16 float32 bits.
LATENT_DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4")}
RE_ENCODE = "re-create them with `fastdit encode`"


_SHARD_FILE = re.compile(r"^shard-\d{5}\.(latents\.npy|flipped\.npy|labels\.npy|json|npz)$")


def is_shard_folder(directory, names) -> bool:
    """Whether ``names`` (the files of ``directory``, unmarked) are a shard folder's only: written by a
    `fastdit encode` from before encode folders were marked."""
    return all(name == MANIFEST or _SHARD_FILE.match(name) for name in names)


def field_path(directory, index: int, field: str) -> str:
    return os.path.join(directory, f"shard-{index:05d}.{field}.npy")


def record_path(directory, index: int) -> str:
    return os.path.join(directory, f"shard-{index:05d}.json")


def to_storage(latents: np.ndarray, latent_dtype: str) -> np.ndarray:
    """float32 latents as stored under ``latent_dtype`` (bf16: rounded to nearest even, as torch does)."""
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    if latent_dtype != "bf16":
        return latents.astype(LATENT_DTYPES[latent_dtype])
    bits = latents.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = np.where(np.isnan(latents), bits | np.uint32(0x00400000), bits + rounding)
    return (rounded >> 16).astype(np.uint16)


def to_float32(stored: np.ndarray, latent_dtype: str) -> np.ndarray:
    if latent_dtype == "bf16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def write_shard(directory, index: int, arrays: dict, latent_dtype: str, settings: dict) -> dict:
    """Write shard ``index``: ``arrays`` (latents and flipped in float32, labels) as .npy files, then its
    record; each file atomically. Returns the record."""
    count = len(arrays["labels"])
    fields = {}
    for field in FIELDS:
        array = (to_storage(arrays[field], latent_dtype) if field in LATENT_FIELDS
                 else np.ascontiguousarray(arrays[field], dtype=np.int64))
        if len(array) != count:
            raise ValueError(f"write_shard: {field} holds {len(array)} items, labels {count}")
        data = write_npy_atomic(field_path(directory, index, field), array)
        fields[field] = {"dtype": array.dtype.str, "shape": list(array.shape), "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()}
    record = {"index": index, "count": count, "latent_dtype": latent_dtype, "fields": fields, "settings": settings}
    write_text_atomic(record_path(directory, index), json.dumps(record, indent=1))
    return record


def read_record(directory, index: int) -> dict | None:
    """Shard ``index``'s record, or None when there is none (not finished) or it cannot be parsed."""
    try:
        with open(record_path(directory, index)) as file:
            record = json.load(file)
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("index") == index else None


def shard_problem(directory, record: dict, checksums: bool) -> str | None:
    """Why shard ``record`` is not intact on disk (a missing file, another size, another sha256), or None."""
    for field, facts in record["fields"].items():
        path = field_path(directory, record["index"], field)
        try:
            size = os.path.getsize(path)
        except OSError:
            return f"{path} is missing"
        if size != facts["bytes"]:
            return f"{path} holds {size} bytes, its record {facts['bytes']}"
        if checksums and (digest := file_sha256(path)) != facts["sha256"]:
            return f"{path}: sha256 {digest} differs from its record's {facts['sha256']}"
    return None


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory, records: list[dict], num_classes: int, settings: dict) -> None:
    """The folder's manifest, from every shard's record in order; written atomically, after them all."""
    manifest = {"format": FORMAT, "version": VERSION, "count": sum(record["count"] for record in records),
                "num_classes": num_classes, "latent_dtype": settings["latent_dtype"], "settings": settings,
                "shards": [{key: record[key] for key in ("index", "count", "fields")} for record in records]}
    write_text_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))


def read_manifest(directory) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as file:
            manifest = json.load(file)
    except ValueError as error:
        raise ValueError(f"data: {path} is not valid JSON ({error}); {RE_ENCODE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"data: {path} is not a fastdit latent-shard manifest; {RE_ENCODE}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"data: {path} is format version {manifest.get('version')!r}; this fastdit reads version "
                         f"{VERSION}: {RE_ENCODE}")
    return manifest


def npz_member(path: str, name: str) -> np.ndarray:
    """Member ``name``.npy of the .npz ``path``: memory-mapped when stored uncompressed (np.savez),
    else read into memory (np.savez_compressed)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as file:
        # The local header's name and extra field lengths may differ from the central directory's.
        file.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(file.read(4), "<u2")
        file.seek(info.header_offset + 30 + int(name_length) + int(extra_length))
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(file)
        offset = file.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


class LatentShards:
    """A shard folder, opened lazily: the manifest is read and every file's size checked at once, the
    files themselves are memory-mapped on first use, so neither opening nor indexing reads the whole
    set. Sample ``i`` is the ``i``-th image of the encode, across shards in order.

    ``checksums=True`` also compares every file's sha256 with the manifest's (a full read: use it after
    copying a set, not on every start). Legacy ``shard-*.npz`` folders have no manifest to check."""

    def __init__(self, directory, checksums: bool = False):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise ValueError(f"data: {self.directory!r} is not a directory of latent shards; make one with "
                             "`fastdit encode`")
        manifest = read_manifest(self.directory)
        if manifest is not None:
            self._open_manifest(manifest, checksums)
        else:
            self._open_legacy()
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.description = f"latents in {self.directory}"

    def _open_manifest(self, manifest, checksums):
        self.latent_dtype = manifest["latent_dtype"]
        self.num_classes = int(manifest["num_classes"])
        self.paths, self.counts, self._arrays, self.facts = [], [], [], []
        expected = None
        for shard in manifest["shards"]:
            record = {"index": shard["index"], "fields": shard["fields"]}
            if problem := shard_problem(self.directory, record, checksums):
                raise ValueError(f"data: {problem}; the shard is damaged or from another encode: {RE_ENCODE}")
            shapes = {field: (facts["dtype"], tuple(facts["shape"][1:])) for field, facts in shard["fields"].items()}
            if expected is not None and shapes != expected:
                raise ValueError(f"data: shard {shard['index']} in {self.directory} holds {shapes}, shard 0 "
                                 f"{expected}: shards from different encodes; {RE_ENCODE}")
            expected = shapes
            self.paths.append({field: field_path(self.directory, shard["index"], field) for field in FIELDS})
            self.facts.append({field: (np.dtype(facts["dtype"]), tuple(facts["shape"]))
                               for field, facts in shard["fields"].items()})
            self.counts.append(int(shard["count"]))
            self._arrays.append(None)
        self.latent_shape = expected["latents"][1]

    def _open_legacy(self):
        names = sorted(name for name in os.listdir(self.directory)
                       if name.startswith("shard-") and name.endswith(".npz"))
        if not names:
            unfinished = any(name.startswith("shard-") and name.endswith(".json") for name in os.listdir(self.directory))
            if unfinished:
                raise ValueError(f"data: {self.directory!r} holds an unfinished encode (shards but no {MANIFEST}); "
                                 "rerun the same `fastdit encode` command to finish it")
            raise ValueError(f"data: no latent shards ({MANIFEST} or shard-*.npz) in {self.directory!r}; make them "
                             "with `fastdit encode`")
        self.latent_dtype = None
        self.paths = [{field: os.path.join(self.directory, name) for field in FIELDS} for name in names]
        self.facts = [None] * len(names)  # no manifest: the shapes are compared across shards below
        self._arrays = []
        for paths in self.paths:
            try:
                self._arrays.append({field: npz_member(paths[field], field) for field in FIELDS})
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
                raise ValueError(f"data: cannot read {paths['labels']} ({error}); {RE_ENCODE}") from None
        self.counts = [len(arrays["labels"]) for arrays in self._arrays]
        shapes = {arrays["latents"].shape[1:] for arrays in self._arrays} | {a["flipped"].shape[1:] for a in self._arrays}
        if len(shapes) != 1:
            raise ValueError(f"data: the shards in {self.directory} hold latents of shapes {sorted(shapes)}: shards "
                             f"from different encodes; {RE_ENCODE}")
        self.latent_shape = shapes.pop()
        # The old format kept no class count: the largest label tells it.
        self.num_classes = max(int(arrays["labels"].max()) for arrays in self._arrays if len(arrays["labels"])) + 1

    def __len__(self):
        return int(self.offsets[-1])

    def shard(self, index: int) -> dict:
        """Shard ``index``'s fields, memory-mapped (opened on first use)."""
        if self._arrays[index] is None:
            arrays = {field: np.load(path, mmap_mode="r", allow_pickle=False)
                      for field, path in self.paths[index].items()}
            for field, array in arrays.items():
                rows = self.counts[index]
                if len(array) != rows:
                    raise ValueError(f"data: {self.paths[index][field]} holds {len(array)} rows, the manifest "
                                     f"{rows}; {RE_ENCODE}")
                # A file of another encode can have this one's size (fp32 (n, 4, 4, 2) against fp16 (n, 4, 4, 4)):
                # its header tells, and costs nothing to read.
                expected = self.facts[index] and self.facts[index][field]
                if expected and (array.dtype, array.shape) != expected:
                    raise ValueError(f"data: {self.paths[index][field]} holds {array.dtype.str} {array.shape}, the "
                                     f"manifest {expected[0].str} {expected[1]}: a file from a different encode; "
                                     f"{RE_ENCODE}")
            self._arrays[index] = arrays
        return self._arrays[index]

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index within it) of each global index; out-of-range indices are an IndexError."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"data: sample indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        shards = np.searchsorted(self.offsets, indices, side="right") - 1
        return shards, indices - self.offsets[shards]

    def gather(self, indices) -> dict:
        """``latents`` and ``flipped`` (float32, (n, C, h, w)) and ``labels`` (int64) of the global
        ``indices``, in their order; reads only those rows."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        shards, rows = self.locate(indices)
        out = {field: np.empty((len(indices), *self.latent_shape), np.float32) for field in LATENT_FIELDS}
        out["labels"] = np.empty(len(indices), np.int64)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            # Rows in file order: a memory map reads sorted rows with fewer seeks.
            order = np.argsort(rows[where], kind="stable")
            where, local = where[order], rows[where][order]
            arrays = self.shard(int(shard))
            for field in FIELDS:
                values = arrays[field][local]
                out[field][where] = to_float32(values, self.latent_dtype) if field in LATENT_FIELDS else values
        return out

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(latents, flipped, label) of sample ``index``."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"data: expected an integer sample index, got {type(index).__name__}")
        index = int(index) + (len(self) if index < 0 else 0)
        batch = self.gather([index])
        return batch["latents"][0], batch["flipped"][0], int(batch["labels"][0])

    def check_labels(self) -> None:
        """Raise naming the first label outside [0, num_classes): the training run would take such a class for
        the null class of guidance, or fail in the embedding. Reads every labels file (8 bytes a sample)."""
        for shard in range(len(self.paths)):
            labels = self.shard(shard)["labels"]
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if len(bad):
                raise ValueError(f"data: {self.paths[shard]['labels']}: labels[{bad[0]}] is {labels[bad[0]]}, outside "
                                 f"the {self.num_classes} classes (0 to {self.num_classes - 1}) of "
                                 f"{os.path.join(self.directory, MANIFEST)}; {RE_ENCODE}")

    def verify_checksums(self, shards=None) -> None:
        """Compare every file's sha256 (of all shards, or of the indices ``shards``) with the manifest's (a full
        read); raise naming the first that differs."""
        if self.latent_dtype is None:
            raise ValueError(f"data: {self.directory} is in the old shard-*.npz format, which records no checksums; "
                             f"{RE_ENCODE}")
        manifest = read_manifest(self.directory)
        for position in range(len(manifest["shards"])) if shards is None else shards:
            if problem := shard_problem(self.directory, manifest["shards"][position], checksums=True):
                raise ValueError(f"data: {problem}; the file is damaged: {RE_ENCODE}")

    def find_nonfinite(self, chunk: int = 4096, shards=None):
        """Yield (file, field, index in the shard, global index) of every sample holding a NaN or an
        infinity, reading the shards (all, or the indices ``shards``) ``chunk`` rows at a time."""
        for shard in range(len(self.paths)) if shards is None else shards:
            paths, arrays = self.paths[shard], self.shard(shard)
            for field in LATENT_FIELDS:
                for start in range(0, self.counts[shard], chunk):
                    values = to_float32(arrays[field][start:start + chunk], self.latent_dtype)
                    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
                    for row in np.flatnonzero(bad):
                        yield paths[field], field, start + int(row), int(self.offsets[shard]) + start + int(row)

    def check_finite(self, shards=None) -> None:
        """Raise a ValueError naming the shard file and index of the first non-finite sample (a full read
        of the shards, or of the indices ``shards``)."""
        for path, field, row, index in self.find_nonfinite(shards=shards):
            raise ValueError(f"data: {path}: {field}[{row}] (sample {index}) holds a non-finite value; "
                             f"{RE_ENCODE} or remove it")

"""The images an evaluation reads, without loading them: an ``.npz`` member memory-mapped in place, or the
batch files of a sample run, read a batch at a time by DataLoader workers.

- An ``.npz`` written by ``np.savez`` or ``fastdit sample`` stores its members uncompressed, so a member is a
  plain ``.npy`` at some offset of the file: ``np.memmap`` reads any image range from it. Images are the
  member ``arr_0`` (what the ADM suite reads; fastdit's samples.npz has it too), else ``images``. A compressed
  member (``np.savez_compressed``) cannot be read in place and is refused.
- A folder: a sample run's ``--out`` (its samples.npz), or a folder of batch files ``<first index>.npy``
  (``batches/`` of a kept staging folder, or that folder itself) that together cover 0..N-1.
- A reference may also hold precomputed statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``), used as they are.
"""
import dataclasses
import os
import re
import struct
import zipfile

import numpy as np

IMAGE_MEMBERS = ("arr_0", "images")
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")
_BATCH_FILE = re.compile(r"^(\d+)\.npy$")
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local header (30 bytes)


class InputError(ValueError):
    """An input that cannot be evaluated, in one line."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """``count`` images stored at ``offset`` of ``path`` (an .npy's data) as a C-ordered uint8 array."""

    path: str
    offset: int
    start: int
    count: int


class ImageSource:
    """uint8 images (N, H, W, C) spread over pieces of files; ``read(start, stop)`` maps only what it reads, so a
    source pickles cheaply into DataLoader workers and holds no open file."""

    def __init__(self, description: str, pieces: list[Piece], image_shape: tuple):
        self.description, self.pieces, self.image_shape = description, pieces, tuple(image_shape)
        self.length = sum(piece.count for piece in pieces)

    def __len__(self):
        return self.length

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for piece in self.pieces:
            first, last = max(start, piece.start), min(stop, piece.start + piece.count)
            if first < last:
                mapped = np.memmap(piece.path, np.uint8, "r", offset=piece.offset,
                                   shape=(piece.count, *self.image_shape))
                parts.append(np.array(mapped[first - piece.start:last - piece.start]))
                del mapped
        images = np.concatenate(parts) if len(parts) != 1 else parts[0]
        return images if len(self.image_shape) == 3 else images[..., None]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.image_shape[0], self.image_shape[1]

    @property
    def channels(self) -> int:
        return self.image_shape[2] if len(self.image_shape) == 3 else 1


def _npy_header(file, what) -> tuple[tuple, np.dtype, int]:
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(file)
        if version not in readers:
            raise ValueError(f".npy format version {version}; expected 1.0 or 2.0, as np.save writes")
        shape, fortran, dtype = readers[version](file)
    except (ValueError, EOFError) as error:
        raise InputError(f"{what}: not a readable .npy array ({error})") from None
    if fortran:
        raise InputError(f"{what}: a Fortran-ordered array; expected a C-ordered one (np.save's default)")
    return shape, dtype, file.tell()


def _check_images(shape, dtype, what):
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise InputError(f"{what}: expected uint8 images (N, H, W, 3), (N, H, W, 1) or (N, H, W), got {dtype} of "
                         f"shape {shape}")


def _member_offset(file, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, whose name and extra fields may differ in
    length from the central directory's."""
    file.seek(info.header_offset)
    header = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    return info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1]


def read_npz(path, what: str) -> tuple[ImageSource | None, dict]:
    """The images of an .npz (or None) and its precomputed statistics (``STATISTICS`` present in it)."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"{what} {path}: not a NumPy .npz archive")
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
            statistics = {}
            for name in STATISTICS:
                if name in members:
                    with archive.open(members[name]) as member:
                        statistics[name] = np.lib.format.read_array(member, allow_pickle=False).astype(np.float64)
            image_name = next((name for name in IMAGE_MEMBERS if name in members), None)
            if image_name is None:
                return None, statistics
            info = members[image_name]
            if info.compress_type != zipfile.ZIP_STORED:
                raise InputError(f"{what} {path}: {image_name} is compressed (np.savez_compressed); the evaluation "
                                 "reads images in place: save it with np.savez")
            start = _member_offset(file, info)
            file.seek(start)
            shape, dtype, data = _npy_header(file, f"{what} {path} ({image_name})")
    except InputError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, struct.error, ValueError) as error:
        raise InputError(f"{what} {path}: cannot read it as a NumPy .npz archive ({error})") from None
    _check_images(shape, dtype, f"{what} {path} ({image_name})")
    if data + int(np.prod(shape)) > min(start + info.compress_size, os.path.getsize(path)):
        raise InputError(f"{what} {path}: {image_name} is truncated (a damaged archive)")
    return ImageSource(f"{path} ({image_name})", [Piece(path, data, 0, shape[0])], shape[1:]), statistics


def _batch_folder(folder, what) -> ImageSource:
    starts = sorted((int(match[1]), entry) for entry in os.listdir(folder) if (match := _BATCH_FILE.match(entry)))
    if not starts:
        raise InputError(f"{what} {folder}: a folder without samples.npz or batch files (<first index>.npy); "
                         "expected a sample run's --out or its batches/ folder")
    pieces, image_shape = [], None
    for start, name in starts:
        path = os.path.join(folder, name)
        with open(path, "rb") as file:
            shape, dtype, offset = _npy_header(file, f"{what} {path}")
        _check_images(shape, dtype, f"{what} {path}")
        expected = sum(piece.count for piece in pieces)
        if start != expected:
            raise InputError(f"{what} {folder}: the batch files do not cover the images in order: {name} starts at "
                             f"{start}, expected {expected} (an unfinished run's batches?)")
        if image_shape is not None and shape[1:] != image_shape:
            raise InputError(f"{what} {path}: images of shape {shape[1:]}, the other batches' {image_shape}")
        if offset + int(np.prod(shape)) > os.path.getsize(path):
            raise InputError(f"{what} {path}: truncated")
        image_shape = shape[1:]
        pieces.append(Piece(path, offset, start, shape[0]))
    return ImageSource(f"{folder} (batch files)", pieces, image_shape)


def open_images(path, what: str) -> ImageSource:
    """SAMPLES as an ``ImageSource``: an .npz, a sample run's --out, or a folder of batch files."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "samples.npz")):
            path = os.path.join(path, "samples.npz")
        else:
            return _batch_folder(os.path.join(path, "batches") if os.path.isdir(os.path.join(path, "batches"))
                                 else path, what)
    elif not os.path.isfile(path):
        raise InputError(f"{what} {path}: no such file or folder")
    images, _ = read_npz(path, what)
    if images is None:
        raise InputError(f"{what} {path}: holds no images (no {' or '.join(IMAGE_MEMBERS)})")
    return images


def open_reference(path) -> tuple[ImageSource | None, dict]:
    """REF's images (None when it has only statistics) and its precomputed statistics."""
    if not os.path.isfile(path):
        raise InputError(f"REF {path}: {'a folder' if os.path.isdir(path) else 'no such file'}; expected an .npz "
                         "reference batch (ADM's VIRTUAL_imagenet256_labeled.npz and the like) or a samples.npz")
    images, statistics = read_npz(path, "REF")
    pairs = {"mu": "sigma", "mu_s": "sigma_s"}
    statistics = {name: statistics[name] for mean, covariance in pairs.items() if {mean, covariance} <= set(statistics)
                  for name in (mean, covariance)}
    if images is None and not statistics:
        raise InputError(f"REF {path}: holds neither images ({' or '.join(IMAGE_MEMBERS)}) nor statistics (mu and "
                         "sigma, mu_s and sigma_s)")
    return images, statistics

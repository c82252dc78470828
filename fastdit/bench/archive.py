"""The one archive a device run brings back: its scratch folder (manifest.json, the log, every step's
reports) as a .tar.gz, rebuilt after every step under a temporary name and renamed into place, so that
whatever stops the run, the archive in ``$OUT`` is whole and holds every finished step.

``manifest.json`` says what produced it (``identity``: fastdit's version and a digest of its sources, the
device) and each step's status; ``read`` refuses an archive whose identity differs from the run's, so a
``--resume`` never merges measurements of another GPU or another fastdit."""
import hashlib
import io
import json
import os
import pathlib
import tarfile
import zlib

import fastdit
from fastdit.io import atomic_path

MANIFEST = "manifest.json"
FORMAT = 1


class ArchiveError(ValueError):
    """An archive that cannot be read, or that another GPU or another fastdit wrote."""


def source_digest() -> str:
    """sha256 over fastdit's Python sources (the kernels included), by relative path: two checkouts with the
    same digest measure the same code."""
    from fastdit.bench.device_plan import python_files

    root = pathlib.Path(fastdit.__file__).parent
    digest = hashlib.sha256()
    for path in python_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_identity() -> dict:
    return {"fastdit": fastdit.__version__, "sources": source_digest()}


def write(scratch, path, manifest: dict) -> None:
    """``scratch`` (with ``manifest`` as its manifest.json) as the .tar.gz ``path``, atomically."""
    scratch = pathlib.Path(scratch)
    (scratch / MANIFEST).write_text(json.dumps({**manifest, "format": FORMAT}, indent=2) + "\n")
    with atomic_path(path) as temporary, tarfile.open(temporary, "w:gz") as archive:
        for member in sorted(scratch.rglob("*")):
            if member.is_file() and not member.name.startswith("."):
                archive.add(member, arcname=member.relative_to(scratch).as_posix(), recursive=False)


def read(path) -> tuple[dict, tarfile.TarFile]:
    """(manifest, the open archive) of ``path``; ArchiveError names what is wrong with it."""
    try:
        archive = tarfile.open(path, "r:gz")
        members = {member.name: member for member in archive.getmembers()}
        manifest = json.load(io.TextIOWrapper(archive.extractfile(members[MANIFEST])))
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("steps"), dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT} with a steps table")
    except KeyError:
        raise ArchiveError(f"{path} is not a device-check archive: it has no {MANIFEST}") from None
    except (OSError, EOFError, zlib.error, tarfile.TarError, ValueError, AttributeError) as error:
        raise ArchiveError(f"{path} is damaged or not a device-check archive ({type(error).__name__}: "
                           f"{error})") from None
    for name, member in members.items():
        if not member.isfile() or name.startswith("/") or ".." in pathlib.PurePosixPath(name).parts:
            raise ArchiveError(f"{path} holds {name!r}, which is not a plain file inside the archive")
    return manifest, archive


def check_identity(manifest: dict, identity: dict, path) -> None:
    """Refuse an archive written by other code or on another device than ``identity`` describes."""
    for key, value in identity.items():
        recorded = manifest.get("identity", {}).get(key)
        if recorded != value:
            raise ArchiveError(f"{path} was written with {key} {recorded!r}, this run has {value!r}: its "
                               "measurements cannot be merged; start without --resume")


def extract(archive: tarfile.TarFile, directory) -> None:
    """Every member into ``directory`` (``read`` has checked that each is a plain file inside it)."""
    for member in archive.getmembers():
        target = pathlib.Path(directory, member.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.extractfile(member).read())

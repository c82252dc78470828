"""Files a crash cannot leave half-written, and folders two processes cannot share by accident.

``atomic_path`` writes beside the target and renames over it, so a reader (or a crash) sees the old
file or the new one, never a part. A crash between the two can leave the temporary behind:
``remove_stale_temporaries`` clears them once the folder is ours again. ``exclusive_lock`` makes a
folder ours: an advisory ``flock`` that the kernel drops when its process dies, however it dies.
``replace_directory`` does for a folder what ``atomic_path`` does for a file: a complete new folder takes
the old one's place in one step (``restore_replaced`` undoes what a kill leaves where that takes two).
``atomic_directory`` builds a new folder beside a path that must not exist and renames it there, never
over anything. ``check_owned_folder`` and ``mark_owned_folder`` keep a run from writing into a folder that
is not its own: a folder fastdit writes in is new, empty, or marked as a run folder of the same command.
"""
import contextlib
import ctypes
import errno
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no flock, and no locking (fastdit's runs target Linux)
    fcntl = None

TEMPORARY_SUFFIX = ".tmp"
# What atomic_path names its temporaries: ".<target name>.<mkstemp's random part>.tmp".
_TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+" + re.escape(TEMPORARY_SUFFIX) + "$")


# The file that marks a folder as a run folder of one fastdit command (its JSON names the command).
RUN_MARKER = ".fastdit-run.json"


class FolderInUseError(OSError):
    """Another live process holds the folder's lock."""


def check_owned_folder(path, command: str, flag: str = "--out", ignore=(), legacy=None) -> None:
    """Raise unless a run of ``fastdit command`` may write in the folder ``path``: missing, empty (but for the
    names in ``ignore`` and ``atomic_path`` temporaries), marked by ``mark_owned_folder`` as ``command``'s, or
    unmarked with ``legacy(names)`` true (a run folder written before the marker existed). A folder of anything
    else is refused in one line naming what it holds: nothing a fastdit run did not write is written over."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    try:
        with open(os.path.join(path, RUN_MARKER)) as file:
            marker = json.load(file)
    except FileNotFoundError:
        marker = None
    except (OSError, ValueError):
        marker = {}
    if marker is not None:
        owner = marker.get("command") if isinstance(marker, dict) else None
        if owner == command:
            return
        raise ValueError(f"{flag} {path}: is the run folder of `fastdit {owner}`, not of `fastdit {command}` "
                         f"({RUN_MARKER} says so); choose another folder")
    names = sorted(name for name in os.listdir(path) if name not in ignore and not _TEMPORARY_NAME.match(name))
    if not names or (legacy is not None and legacy(path, names)):
        return
    raise ValueError(f"{flag} {path}: holds files that no `fastdit {command}` run wrote ({', '.join(names[:3])}"
                     f"{', ...' if len(names) > 3 else ''}); fastdit never writes over them: choose a new or empty "
                     "folder")


def mark_owned_folder(path, command: str) -> None:
    """Mark the folder ``path`` as a run folder of ``fastdit command`` (after ``check_owned_folder``, under
    the folder's lock)."""
    marker = os.path.join(path, RUN_MARKER)
    if not os.path.exists(marker):
        write_text_atomic(marker, json.dumps({"command": command}) + "\n")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on
    POSIX within one filesystem), on error it is removed and ``path`` is left untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                         suffix=TEMPORARY_SUFFIX)
    os.close(handle)
    try:
        yield temporary
        # mkstemp (and writers that recreate the file) leave 0600: give it the usual permissions.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            # A write's own error (a full disk) names no file: name the one that could not be written.
            raise OSError(error.errno, error.strerror or str(error), path) from error
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_npy_atomic(path, array: np.ndarray) -> bytes:
    """Write ``array`` as a ``.npy`` file (no pickled objects), atomically and fsynced; returns the file's bytes,
    for a record of their size and checksum."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return data


def write_npz_streamed(path, arrays) -> None:
    """Write ``path`` as ``np.savez`` does (an uncompressed zip64 archive of ``.npy`` members, which
    ``np.load`` and the ADM evaluator's streaming reader read), each member written piece by piece, so that
    an archive larger than memory needs one piece in memory at a time. ``arrays`` maps a member's name to
    an array, or to ``(shape, dtype, pieces)``: ``pieces()`` yields arrays of that dtype whose rows,
    concatenated, make ``shape``. Fixed timestamps: the same arrays give the same bytes. Atomic as
    ``atomic_path``."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                if not isinstance(value, tuple):
                    array = np.asarray(value)
                    value = (array.shape, array.dtype, lambda array=array: [array])
                _write_npy_member(archive, name, *value)
        file.flush()
        os.fsync(file.fileno())


def _write_npy_member(archive, name, shape, dtype, pieces):
    shape, dtype = tuple(shape), np.dtype(dtype)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    rows = 0
    with archive.open(info, "w", force_zip64=True) as member:  # np.savez forces zip64 too
        member.write(header.getvalue())
        for piece in pieces():
            if piece.dtype != dtype or piece.shape[1:] != shape[1:]:
                raise ValueError(f"{name}: a piece of shape {piece.shape} and dtype {piece.dtype} in an array of "
                                 f"shape {shape} and dtype {dtype}")
            member.write(np.ascontiguousarray(piece).data)
            rows += len(piece) if piece.ndim else 1
    if rows != (shape[0] if shape else 1):
        raise ValueError(f"{name}: the pieces hold {rows} rows, the array's shape {shape}")


def remove_stale_temporaries(directory) -> list[str]:
    """Remove the temporaries that ``atomic_path`` left in ``directory`` when its process was killed
    mid-write; return their paths. Call it only while holding the folder's ``exclusive_lock``: another
    writer's temporary is not stale."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and _TEMPORARY_NAME.match(entry.name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed.append(entry.path)
    return removed


@contextlib.contextmanager
def exclusive_lock(lock_path, what: str):
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed) for the block, or raise
    ``FolderInUseError`` naming ``what`` and the holder's pid at once (no waiting). The lock file keeps
    the holder's pid for that message; the kernel releases the lock when the holder exits, even by
    SIGKILL, so a leftover lock file never blocks a later run."""
    if fcntl is None:
        yield
        return
    lock_path = os.fspath(lock_path)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FolderInUseError(f"{what} is in use by another fastdit process (pid {holder}); wait for it to "
                                   "finish or choose another folder") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


def fsync_directory(path) -> None:
    """Make the renames and creations in directory ``path`` survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # from <linux/fs.h>


def _renameat2(first, second, flags: int) -> bool:
    """Linux renameat2(first, second, flags); False where the OS, libc or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100  # from <fcntl.h>
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)


def exchange(first, second) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem
    cannot."""
    return _renameat2(first, second, _RENAME_EXCHANGE)


def _rename_no_replace(source, destination) -> None:
    """Rename ``source`` to ``destination``, or raise FileExistsError if ``destination`` exists. rename(2)
    would replace an empty folder or a file made meanwhile; RENAME_NOREPLACE checks and renames in one step
    (elsewhere the check comes just before the rename)."""
    if _renameat2(source, destination, _RENAME_NOREPLACE):
        return
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), destination)
    os.rename(source, destination)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a new empty folder beside ``path``; when the block succeeds the folder becomes ``path``, which
    must not exist then (it is never replaced: FileExistsError), and when it fails the folder is removed.
    A reader (or a crash) sees no ``path`` or the complete one."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=TEMPORARY_SUFFIX)
    try:
        yield temporary
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp's 0700 -> the usual permissions
        fsync_directory(temporary)
        _rename_no_replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    fsync_directory(parent)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _aside_prefix(path) -> str:
    return f".{os.path.basename(path)}.previous-"


def replace_directory(new, path) -> None:
    """Make the complete directory ``new`` the directory ``path`` in one atomic step, then remove what
    ``path`` held. ``new`` must be on ``path``'s filesystem. Where the exchange is not supported (another
    OS, a filesystem without it) it is two renames, the old ``path`` moved aside to
    ``.<name>.previous-*`` first: a kill between the two leaves ``path`` missing, and
    ``restore_replaced(path)`` puts the old directory back."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    fsync_directory(new)
    if not os.path.exists(path):
        os.rename(new, path)
    elif exchange(new, path):
        shutil.rmtree(new)  # now the previous directory
    else:
        # An empty directory of a fresh name, which rename(2) replaces: no name another process could take.
        previous = tempfile.mkdtemp(prefix=_aside_prefix(path), dir=parent)
        os.rename(path, previous)
        os.rename(new, path)
        shutil.rmtree(previous)
    fsync_directory(parent)


def restore_replaced(path) -> None:
    """Undo what a killed ``replace_directory`` fallback left: put the previous directory back when
    ``path`` is missing, else remove it. Call it only while holding the folder's ``exclusive_lock``."""
    path = os.path.abspath(path)
    parent, prefix = os.path.dirname(path), _aside_prefix(path)
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.scandir(parent), key=lambda entry: entry.name):
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        if not os.path.exists(path):
            os.rename(entry.path, path)
        else:
            shutil.rmtree(entry.path)

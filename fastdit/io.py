"""Files a crash cannot leave half-written, and folders two processes cannot share by accident.

``atomic_path`` writes beside the target and renames over it, so a reader (or a crash) sees the old
file or the new one, never a part. A crash between the two can leave the temporary behind:
``remove_stale_temporaries`` clears them once the folder is ours again. ``exclusive_lock`` makes a
folder ours: an advisory ``flock`` that the kernel drops when its process dies, however it dies.
"""
import contextlib
import errno
import os
import re
import tempfile

try:
    import fcntl
except ImportError:  # not POSIX: no flock, and no locking (fastdit's runs target Linux)
    fcntl = None

TEMPORARY_SUFFIX = ".tmp"
# What atomic_path names its temporaries: ".<target name>.<mkstemp's random part>.tmp".
_TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+" + re.escape(TEMPORARY_SUFFIX) + "$")


class FolderInUseError(OSError):
    """Another live process holds the folder's lock."""


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
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp (and writers that recreate the file) leave 0600: give it the usual permissions.
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


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

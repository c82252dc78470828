"""One process per device under ``torchrun``, one process without it: the same code runs either way.

``torchrun`` (``python -m torch.distributed.run``) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; with them ``launch`` joins the process group (NCCL for CUDA devices, gloo otherwise), without
them it makes no group and the run is rank 0 of 1. ``shard`` splits work into contiguous pieces, so that
``gather_to_main`` on rank 0 puts the pieces back in their global order.
"""
import contextlib
import dataclasses
import functools
import os
import select
import socket
import sys
import threading
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Process:
    """This process's place in the run: ``backend`` is None when there is no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_main_process() -> bool:
    """Rank 0, or a single process; usable before (and without) ``launch``."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(requested=None, local_rank=0, world_size=1) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1", ...; default cuda when there is one) as a torch.device; with
    several processes each takes cuda:``local_rank``, so an explicit index is an error there."""
    requested = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as cpu, cuda or cuda:1, got {requested!r}") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device: {requested!r} needs CUDA, which this machine does not have; use cpu")
    if world_size > 1 and device.index is not None:
        raise ValueError(f"device: with {world_size} processes each uses cuda:LOCAL_RANK; pass 'cuda', "
                         f"not {requested!r}")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device: cuda:{index} does not exist; this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    return torch.device("cuda", index)


@contextlib.contextmanager
def launch(device=None):
    """Yield this process's ``Process``, in the process group when torchrun started it (left on exit)."""
    if not launched_by_torchrun():
        yield Process(0, 1, 0, resolve_device(device), None)
        return
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = resolve_device(device, local_rank, world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives and NCCL use the current device
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield Process(rank, world_size, local_rank, device, backend)
    finally:
        dist.destroy_process_group()


def shard(count: int, rank: int, world_size: int) -> range:
    """The contiguous piece of ``range(count)`` that ``rank`` takes; the first ``count % world_size``
    ranks take one item more."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def fail_together(fn, process: Process):
    """``fn()`` on every rank; if it raises on any rank, every rank raises (its own error, else the lowest
    failing rank's), so that no rank goes on to wait in a collective for one that has stopped."""
    try:
        result, error = fn(), None
    except Exception as raised:  # handed to the other ranks below
        result, error = None, raised
    if process.world_size > 1:
        errors = [None] * process.world_size
        dist.all_gather_object(errors, error)
        error = error or next((other for other in errors if other is not None), None)
    if error is not None:
        raise error
    return result


def broadcast_from_main(value, process: Process):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if process.world_size == 1:
        return value
    holder = [value if process.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def check_shared_folder(directory, process: Process, flag: str, wait_s: float = 5.0) -> None:
    """Raise on every rank unless every rank sees ``directory`` as rank 0 writes it. On several machines
    a folder that one rank writes and another reads (shards, checkpoints, per-rank outputs) must be on a
    filesystem they all mount at the same path; a machine-local folder would leave rank 0 waiting for
    files it never sees, or ranks resuming from different checkpoints. Rank 0 must have created it. A
    marker rank 0 writes is looked for by the others, for up to ``wait_s`` (a network filesystem may
    show a new file late); it is named as ``atomic_path`` names its temporaries, so a kill's leftover is
    cleared with them."""
    if process.world_size == 1:
        return
    token = broadcast_from_main(uuid.uuid4().hex if process.is_main else None, process)
    marker = os.path.join(directory, f".shared-check.{token}.tmp")
    hosts = [None] * process.world_size
    dist.all_gather_object(hosts, socket.gethostname())

    def write():
        if process.is_main:
            with open(marker, "w") as file:
                file.write(token)

    def look():
        deadline = time.monotonic() + wait_s
        while not process.is_main and not os.path.exists(marker):
            if time.monotonic() > deadline:
                raise ValueError(f"{flag}: rank {process.rank} (on {hosts[process.rank]}) does not see the folder "
                                 f"{directory!r} that rank 0 (on {hosts[0]}) writes to; with several machines, put "
                                 "it on a filesystem every machine mounts at the same path")
            time.sleep(0.1)

    try:
        fail_together(write, process)
        fail_together(look, process)
    finally:
        if process.is_main:
            with contextlib.suppress(FileNotFoundError):
                os.remove(marker)


def gather_to_main(array: np.ndarray, process: Process):
    """Rank 0 gets every rank's ``array`` concatenated along axis 0 in rank order; other ranks get None.
    Non-empty pieces must agree in dtype and trailing shape; an empty piece (a rank with no work) may
    have any shape. Pieces travel one at a time, so rank 0 holds one piece in flight, not all."""
    if process.world_size == 1:
        return array
    pieces = [None] * process.world_size
    dist.all_gather_object(pieces, (array.shape, array.dtype.str))
    filled = [(shape, dtype) for shape, dtype in pieces if shape[0] > 0]
    if len({(shape[1:], dtype) for shape, dtype in filled}) > 1:
        raise ValueError(f"gather_to_main: the ranks' arrays differ in trailing shape or dtype: {pieces}")
    transfer = process.device if process.backend == "nccl" else torch.device("cpu")
    if not process.is_main:
        if array.shape[0]:
            dist.send(torch.from_numpy(np.ascontiguousarray(array)).to(transfer), dst=0)
        return None
    if not filled:
        return array
    trailing, dtype = filled[0][0][1:], np.dtype(filled[0][1])
    parts = [array] if array.shape[0] else []
    for source, (shape, _) in enumerate(pieces[1:], start=1):
        if shape[0]:
            buffer = torch.from_numpy(np.empty((shape[0], *trailing), dtype)).to(transfer)
            dist.recv(buffer, src=source)
            parts.append(buffer.cpu().numpy())
    return np.concatenate(parts)


def worker_options(workers: int, prefetch: int) -> dict:
    """DataLoader keywords for ``workers`` processes (none for 0) that die with this process, however it dies.

    The workers come from a fork server, not a fork of this process: a forked worker would inherit a run
    folder's lock and hold it after this process was killed, refusing the rerun that resumes. A script that
    uses them must therefore guard its entry point (``if __name__ == "__main__":``), as with any non-fork
    multiprocessing. A worker's parent is then the fork server, which torch's worker watchdog watches, and the
    fork server lives while a worker holds its pipe: after a SIGKILL of this process both lived on (one set
    48 minutes after the SIGKILL, 300 MB a process). So each worker watches this process itself (``_die_with``)."""
    if not workers:
        return {}
    return {"num_workers": workers, "prefetch_factor": prefetch, "multiprocessing_context": "forkserver",
            "worker_init_fn": functools.partial(_die_with, os.getpid())}


def _die_with(parent: int, worker_id: int) -> None:
    """In a DataLoader worker: exit as soon as process ``parent`` has ended (a thread waiting on its pidfd).
    Its resource sharer (the thread that hands a batch's tensors to the parent) losing the parent mid-handoff
    is the parent stopping, not an error to print beside the parent's one line."""
    sys.excepthook = functools.partial(_quiet_lost_peer, sys.excepthook)
    try:
        handle = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3, other systems): poll the pid twice a second
        handle = None

    def watch():
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _alive(parent):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="fastdit-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _quiet_lost_peer(excepthook, kind, value, traceback):
    if not issubclass(kind, (ConnectionError, EOFError)):
        excepthook(kind, value, traceback)

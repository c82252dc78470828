import os
import subprocess
import sys
import textwrap

import pytest

from fastdit.io import FolderInUseError, atomic_path, exclusive_lock, remove_stale_temporaries

posix_only = pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")


def test_atomic_path_failure_leaves_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        open(temporary, "wb").write(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_remove_stale_temporaries_removes_only_atomic_path_leftovers(tmp_path):
    kept = ["model.pt", ".hidden", "notes.tmp", "log.jsonl"]
    for name in kept:
        (tmp_path / name).write_text("x")
    stale = tmp_path / ".00000020.pt.k3j_x9a2.tmp"
    stale.write_text("partial")
    assert remove_stale_temporaries(tmp_path) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_stale_temporaries(tmp_path / "missing") == []


@posix_only
def test_exclusive_lock_names_the_holder_and_is_released(tmp_path):
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fastdit.io import exclusive_lock
        with exclusive_lock({str(lock)!r}, "run"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"--out R is in use by another fastdit process \(pid {holder.pid}\)"):
            with exclusive_lock(lock, "--out R"):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    with exclusive_lock(lock, "--out R"):
        assert lock.read_text().strip() == str(os.getpid())


@posix_only
def test_exclusive_lock_is_not_reentrant_across_descriptors(tmp_path):
    # flock locks belong to open file descriptions: a second open in the same process conflicts too,
    # so a run cannot lock its folder twice by mistake and think it is alone.
    with exclusive_lock(tmp_path / ".lock", "the run"):
        with pytest.raises(FolderInUseError, match=f"pid {os.getpid()}"):
            with exclusive_lock(tmp_path / ".lock", "the run"):
                pass

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastdit.io
from fastdit.io import (
    FolderInUseError,
    atomic_directory,
    atomic_path,
    check_owned_folder,
    exchange,
    exclusive_lock,
    mark_owned_folder,
    remove_stale_temporaries,
    replace_directory,
    restore_replaced,
    write_npz_streamed,
)

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
    """)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)  # outside the checkout: the installed fastdit
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


def test_renameat2_exchanges_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").write_text("a")
    if not exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("this OS or filesystem has no renameat2 RENAME_EXCHANGE (the two-rename fallback is tested)")
    assert os.listdir(tmp_path / "b") == ["from_a"] and os.listdir(tmp_path / "a") == []


@pytest.mark.parametrize("exchanges", [True, False], ids=["renameat2", "two renames"])
def test_replace_directory_puts_the_new_folder_in_place_and_removes_the_old(exchanges, tmp_path, monkeypatch):
    if not exchanges:
        monkeypatch.setattr(fastdit.io, "exchange", lambda first, second: False)
    for name in ("out", "new"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"from_{name}").write_text(name)
    replace_directory(tmp_path / "new", tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["from_new"]
    (tmp_path / "newer").mkdir()
    replace_directory(tmp_path / "newer", tmp_path / "missing")  # nothing to replace: a rename
    assert sorted(os.listdir(tmp_path)) == ["missing", "out"]


def test_restore_replaced_puts_back_what_a_kill_between_the_two_renames_moved_aside(tmp_path):
    (tmp_path / ".out.previous-k1ll3d").mkdir()
    (tmp_path / ".out.previous-k1ll3d" / "old").write_text("old")
    (tmp_path / ".other.previous-x").mkdir()  # another folder's: not ours
    restore_replaced(tmp_path / "out")
    assert (tmp_path / "out" / "old").read_text() == "old"
    (tmp_path / ".out.previous-later").mkdir()  # the old folder, after the new one was renamed in
    restore_replaced(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == [".other.previous-x", "out"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "check then rename"])
def test_atomic_directory_appears_whole_or_not_at_all_and_never_replaces(renameat2, tmp_path, monkeypatch):
    if not renameat2:
        monkeypatch.setattr(fastdit.io, "_renameat2", lambda first, second, flags: False)
    out = tmp_path / "parent" / "out"
    with atomic_directory(out) as folder:
        (tmp_path / "parent" / folder / "weights").write_text("w")
        assert not out.exists()
    assert os.listdir(tmp_path / "parent") == ["out"] and (out / "weights").read_text() == "w"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    with pytest.raises(RuntimeError, match="killed"), atomic_directory(tmp_path / "failed") as folder:
        raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["parent"]
    # A folder (even an empty one) or a file that appears at the path meanwhile is never replaced.
    for made, make in [("empty folder", os.mkdir), ("file", lambda path: open(path, "w").close())]:
        late = tmp_path / made
        with pytest.raises(FileExistsError), atomic_directory(late) as folder:
            (tmp_path / folder / "weights").write_text("w")
            make(late)
        assert not late.is_dir() or os.listdir(late) == [], made
    assert sorted(os.listdir(tmp_path)) == ["empty folder", "file", "parent"]  # and no temporary


def test_write_npz_streamed_equals_savez_and_holds_one_piece_at_a_time(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10)
    served = []

    def pieces():
        for start in range(0, 10, 4):
            served.append(start)
            yield images[start:start + 4]

    write_npz_streamed(tmp_path / "streamed.npz", {"arr_0": (images.shape, images.dtype, pieces), "labels": labels})
    np.savez(tmp_path / "saved.npz", arr_0=images, labels=labels)
    with np.load(tmp_path / "streamed.npz") as streamed, np.load(tmp_path / "saved.npz") as saved:
        assert sorted(streamed) == sorted(saved)
        for name in saved:
            np.testing.assert_array_equal(streamed[name], saved[name])
            assert streamed[name].dtype == saved[name].dtype
    assert served == [0, 4, 8]
    before = (tmp_path / "streamed.npz").read_bytes()
    write_npz_streamed(tmp_path / "streamed.npz", {"arr_0": (images.shape, images.dtype, pieces), "labels": labels})
    assert (tmp_path / "streamed.npz").read_bytes() == before  # fixed timestamps: the same bytes


@pytest.mark.parametrize("pieces, words", [
    (lambda: [np.zeros((3, 2), np.uint8)], "hold 3 rows, the array's shape (4, 2)"),
    (lambda: [np.zeros((4, 3), np.uint8)], "a piece of shape (4, 3)"),
    (lambda: [np.zeros((4, 2), np.int16)], "dtype int16"),
])
def test_write_npz_streamed_refuses_pieces_that_do_not_fill_the_array(pieces, words, tmp_path):
    (tmp_path / "x.npz").write_bytes(b"old")
    with pytest.raises(ValueError, match=re.escape(words)):
        write_npz_streamed(tmp_path / "x.npz", {"arr_0": ((4, 2), np.uint8, pieces)})
    assert os.listdir(tmp_path) == ["x.npz"] and (tmp_path / "x.npz").read_bytes() == b"old"


def test_a_write_error_names_the_file(tmp_path):
    with (pytest.raises(OSError, match=re.escape(f"No space left on device: '{tmp_path / 'x.bin'}'")) as raised,
          atomic_path(tmp_path / "x.bin")):
        raise OSError(28, "No space left on device")
    assert raised.value.errno == 28 and os.listdir(tmp_path) == []


def test_a_folder_is_written_only_when_new_empty_or_the_same_commands(tmp_path):
    check_owned_folder(tmp_path / "new", "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lock").write_text("")
    (tmp_path / "empty" / ".x.abc123.tmp").write_text("")  # an atomic_path leftover
    check_owned_folder(tmp_path / "empty", "train", ignore=(".lock",))
    mark_owned_folder(tmp_path / "empty", "train")
    check_owned_folder(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match=r"is the run folder of `fastdit train`, not of `fastdit encode`"):
        check_owned_folder(tmp_path / "empty", "encode")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^--out \S+/model: holds files that no `fastdit train` run wrote "
                                         r"\(config.json\); fastdit never writes over them"):
        check_owned_folder(tmp_path / "model", "train")
    check_owned_folder(tmp_path / "model", "train", legacy=lambda path, names: names == ["config.json"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_owned_folder(tmp_path / "a_file", "train", flag="--data")

"""The device check's archive: written whole (atomically) from a scratch folder, read back with its manifest,
refused when damaged or when a member would land outside the folder; unpack's refusal is one line, exit 2."""
import io
import os
import tarfile

import pytest

from fastdit.bench import archive, unpack


def test_a_scratch_folder_round_trips(tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "bench" / "256").mkdir(parents=True)
    (scratch / "bench" / "256" / "report.json").write_text("{}\n")
    (scratch / "device_check.log").write_text("a line\n")
    manifest = {"identity": archive.code_identity(), "mode": "cpu", "steps": {"probe": {"status": "ok"}}}
    archive.write(scratch, tmp_path / "a.tar.gz", manifest)
    assert sorted(os.listdir(tmp_path)) == ["a.tar.gz", "scratch"]  # no temporary left beside it
    read, opened = archive.read(tmp_path / "a.tar.gz")
    assert read == {**manifest, "format": archive.FORMAT}
    assert sorted(opened.getnames()) == ["bench/256/report.json", "device_check.log", "manifest.json"]
    archive.extract(opened, tmp_path / "back")
    assert (tmp_path / "back" / "bench" / "256" / "report.json").read_text() == "{}\n"
    archive.check_identity(read, archive.code_identity(), "a.tar.gz")
    with pytest.raises(archive.ArchiveError, match="was written with fastdit '.*', this run has '9.9'"):
        archive.check_identity(read, {"fastdit": "9.9"}, "a.tar.gz")


def test_a_member_outside_the_folder_is_refused(tmp_path):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as opened:
        for name, data in (("manifest.json", b'{"format": 1, "steps": {}}'), ("../outside", b"x")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            opened.addfile(member, io.BytesIO(data))
    with pytest.raises(archive.ArchiveError, match="holds '../outside', which is not a plain file inside"):
        archive.read(path)


def test_unpack_refuses_a_damaged_archive_in_one_line(tmp_path, capsys):
    path = tmp_path / "damaged.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 not gzip")
    assert unpack.main([str(path), "--docs", str(tmp_path / "docs")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"{unpack.PROG}: error: {path}: ") and "damaged" in error and error.count("\n") == 1
    assert not (tmp_path / "docs").exists()

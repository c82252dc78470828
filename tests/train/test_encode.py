"""`fastdit encode` on a folder of JPEGs made here, with a tiny random AutoencoderKL: the latents against
the VAE on the release's preprocessing, the same bytes with any number of workers or processes, resumption
after a kill, and the folder's guards."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from image_data import make_image_folder

from fastdit.cli import main
from fastdit.io import FolderInUseError, exclusive_lock
from fastdit.train import encode, shards
from fastdit.train.data import class_folder_files
from fastdit.train.preprocess import center_crop_arr
from fastdit.train.shards import LatentShards

IMAGE_SIZE = 16
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def run_encode(vae, folder, out, **options):
    files, num_classes = class_folder_files(str(folder))
    options = {"batch_size": 2, "shard_size": 5, "progress": False, **options}
    return encode.encode_files(files, num_classes, vae, str(out), IMAGE_SIZE, **options)


def folder_bytes(out):
    """Every shard file's bytes and the manifest: what must be identical between two runs."""
    names = sorted(name for name in os.listdir(out) if name.endswith(".npy") or name == shards.MANIFEST)
    return {name: (out / name).read_bytes() for name in names}


def test_latents_are_the_vae_of_the_release_preprocessing(vae, folder, tmp_path):
    from PIL import Image

    assert run_encode(vae, folder, tmp_path, latent_dtype="fp32") == {"encoded": 3, "kept": 0, "shards": 3}
    data = LatentShards(tmp_path)
    files, _ = class_folder_files(str(folder))
    assert (len(data), data.num_classes, data.latent_shape) == (12, 3, (4, 8, 8))
    with Image.open(files[7][0]) as image:
        pixels = torch.from_numpy(center_crop_arr(image, IMAGE_SIZE))[None]
    latents, flipped, label = data[7]
    torch.testing.assert_close(torch.from_numpy(latents)[None], vae.encode(pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(flipped)[None], vae.encode(pixels.flip(2)), rtol=1e-5, atol=1e-5)
    assert label == files[7][1] == 1
    np.testing.assert_array_equal(data.gather(range(12))["labels"], [label for _, label in files])


@pytest.mark.parametrize("latent_dtype", ["fp16", "bf16"])
def test_half_storage_is_the_fp32_latents_rounded(vae, folder, tmp_path, latent_dtype):
    run_encode(vae, folder, tmp_path / "fp32", latent_dtype="fp32")
    run_encode(vae, folder, tmp_path / "half", latent_dtype=latent_dtype)
    exact, half = LatentShards(tmp_path / "fp32"), LatentShards(tmp_path / "half")
    stored = np.load(shards.field_path(tmp_path / "half", 0, "latents"))
    assert stored.dtype == shards.LATENT_DTYPES[latent_dtype]
    for field in shards.LATENT_FIELDS:
        rounded = shards.to_float32(shards.to_storage(exact.gather(range(12))[field], latent_dtype), latent_dtype)
        np.testing.assert_array_equal(half.gather(range(12))[field], rounded)


def test_workers_give_the_same_bytes(vae, folder, tmp_path):
    run_encode(vae, folder, tmp_path / "serial", workers=0)
    run_encode(vae, folder, tmp_path / "workers", workers=2, prefetch=1)
    assert folder_bytes(tmp_path / "serial") == folder_bytes(tmp_path / "workers")


def test_resume_keeps_finished_shards_and_redoes_damaged_ones(vae, folder, tmp_path, monkeypatch, capsys):
    run_encode(vae, folder, tmp_path / "whole")
    expected = folder_bytes(tmp_path / "whole")
    out = tmp_path / "killed"
    written = []

    def write_two_then_die(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # as a kill between two shards
        written.append(args[1])
        return original(*args, **kwargs)

    original = shards.write_shard
    monkeypatch.setattr(shards, "write_shard", write_two_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_encode(vae, folder, out)
    monkeypatch.undo()
    assert not (out / shards.MANIFEST).exists() and written == [0, 1]
    # A byte changed in a finished shard since: its checksum no longer matches, so it is encoded again.
    path = shards.field_path(out, 1, "labels")
    with open(path, "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)[0]
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last ^ 1]))
    (out / ".shard-00002.latents.npy.abc123.tmp").write_bytes(b"half")  # a kill's leftover
    damaged, recorded = shards.file_sha256(path), shards.read_record(out, 1)["fields"]["labels"]["sha256"]
    capsys.readouterr()
    assert run_encode(vae, folder, out) == {"encoded": 2, "kept": 1, "shards": 3}
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --out: {path}: sha256 {damaged} differs from its record's {recorded}; encoding shard 1 again"]
    assert folder_bytes(out) == expected
    assert not (out / ".shard-00002.latents.npy.abc123.tmp").exists()
    assert run_encode(vae, folder, out) == {"encoded": 0, "kept": 3, "shards": 3}


def test_a_different_encode_in_the_folder_is_refused(vae, folder, tmp_path):
    run_encode(vae, folder, tmp_path)
    with pytest.raises(ValueError, match=r"--out: .* holds shards of a different encode \(they differ in "
                                         r"shard_size 5 \(now 4\)\); choose another folder"):
        run_encode(vae, folder, tmp_path, shard_size=4)
    # Other images under the same names (the folder replaced meanwhile): another encode too (issue 27).
    replaced = tmp_path.parent / f"{tmp_path.name}-replaced"
    shutil.copytree(folder, replaced)
    with open(replaced / "class0" / "000.jpg", "ab") as file:
        file.write(b"\0")
    with pytest.raises(ValueError, match=r"holds shards of a different encode \(they differ in files_sha256 "):
        run_encode(vae, replaced, tmp_path)
    np.savez(tmp_path / "shard-00000.npz", labels=np.zeros(1))
    with pytest.raises(ValueError, match="holds shards of the old .npz format"):
        run_encode(vae, folder, tmp_path)


def test_the_folder_is_locked(vae, folder, tmp_path):
    os.makedirs(tmp_path / "out")
    in_use = f"--out {tmp_path / 'out'} is in use by another fastdit process"
    with exclusive_lock(tmp_path / "out" / encode.LOCK, "test"), pytest.raises(FolderInUseError, match=in_use):
        run_encode(vae, folder, tmp_path / "out")


def test_bad_input(vae, folder, tmp_path):
    bad = make_image_folder(tmp_path / "bad", per_class=(2,))
    (bad / "class0" / "001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"--data: .*class0/001.jpg: cannot read it as an image"):
        run_encode(vae, bad, tmp_path / "out", workers=1)
    with pytest.raises(ValueError, match="--image-size: expected a multiple of the VAE's downsampling 2, got 15"):
        encode.encode_files(*class_folder_files(str(folder)), vae, str(tmp_path / "o"), 15, 2, 5)
    with pytest.raises(ValueError, match="--latent-dtype: expected one of fp16, bf16, fp32, got 'int8'"):
        run_encode(vae, folder, tmp_path / "o", latent_dtype="int8")


def test_cli(vae_dir, folder, tmp_path, capsys):
    arguments = ["encode", "--data", str(folder), "--vae", str(vae_dir), "--out", str(tmp_path / "out"),
                 "--image-size", str(IMAGE_SIZE), "--shard-size", "5", "--workers", "0", "--device", "cpu"]
    assert main(arguments) == 0
    assert "3 shard(s), 3 encoded by this process now, 0 kept" in capsys.readouterr().out
    assert LatentShards(tmp_path / "out").latent_dtype == "fp16"
    assert main(arguments[:-4] + ["--workers", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "fastdit encode: error: --workers: expected an integer in [0, 256], got -1"


def encode_command(folder, vae_dir, out, workers=0):
    return ["encode", "--data", str(folder), "--vae", str(vae_dir), "--out", str(out), "--image-size",
            str(IMAGE_SIZE), "--batch-size", "2", "--shard-size", "3", "--workers", str(workers), "--device", "cpu"]


@pytest.mark.slow
def test_torchrun_splits_the_shards_and_gives_the_same_bytes(vae_dir, folder, tmp_path):
    assert main(encode_command(folder, vae_dir, tmp_path / "one")) == 0
    result = subprocess.run(check=False, args=[*TORCHRUN, "--nproc_per_node", "3", "-m", "fastdit",
                             *encode_command(folder, vae_dir, tmp_path / "three", workers=1)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "three")


@pytest.mark.slow
def test_a_killed_encode_resumes_to_the_same_bytes(vae_dir, tmp_path):
    many = make_image_folder(tmp_path / "many", per_class=(30, 30), seed=1)
    assert main(encode_command(many, vae_dir, tmp_path / "whole")) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "fastdit", *encode_command(many, vae_dir, out, workers=1)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while shards.read_record(out, 3) is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert shards.read_record(out, 3) is not None, process.stderr.read().decode()
    assert not (out / shards.MANIFEST).exists(), "the kill came too late to test resumption"
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    kept = int(result.stdout.split(" kept")[0].rsplit(", ", 1)[1])
    assert kept >= 4
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole")
    assert json.loads((out / shards.MANIFEST).read_text())["count"] == 60


def test_a_full_disk_names_the_file_and_leaves_no_finished_looking_shard(vae_dir, folder, tmp_path, monkeypatch,
                                                                         capsys):
    """ENOSPC halfway through shard 1's flipped latents: one line naming that file; shard 1 has no record (so
    no manifest either) and no temporary is left; the rerun, with space again, gives the uninterrupted bytes."""
    from fastdit import io

    assert main(encode_command(folder, vae_dir, tmp_path / "whole")) == 0
    failing = shards.field_path(tmp_path / "out", 1, "flipped")
    write_bytes_atomic = io.write_bytes_atomic

    def full_disk(path, data):
        if path != failing:
            return write_bytes_atomic(path, data)
        with io.atomic_path(path) as temporary, open(temporary, "wb") as file:
            file.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) fails: naming no file

    monkeypatch.setattr(io, "write_bytes_atomic", full_disk)  # under io.write_npy_atomic
    capsys.readouterr()
    assert main(encode_command(folder, vae_dir, tmp_path / "out")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert errors == [f"fastdit encode: error: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '{failing}'"]
    left = sorted(os.listdir(tmp_path / "out"))
    assert "shard-00001.json" not in left and shards.MANIFEST not in left and "shard-00000.json" in left
    assert not [name for name in left if name.endswith(".tmp")], left
    monkeypatch.undo()
    assert main(encode_command(folder, vae_dir, tmp_path / "out")) == 0
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "whole")

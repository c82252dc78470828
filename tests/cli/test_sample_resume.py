"""`fastdit sample` at scale: every batch on disk as it finishes, memory that does not grow with --num-samples,
a killed run resumed by the same command to the same bytes, another command refused (or --restart), and
torchrun's ranks writing the same files as one process."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from parity import save_tiny_checkpoint
from PIL import Image
from processes import torch_path_environment

import fastdit
from fastdit.cli import sample_output
from fastdit.cli import sample as sample_cli

FAST = ["--sampler", "ddim", "--steps", "1", "--no-progress"]
REAL_SAMPLE = sample_cli.sample


def staging_folders(parent):
    return sorted(name for name in os.listdir(parent) if ".staging-" in name)


def interrupted_after(monkeypatch, batches):
    """Make the run stop with a KeyboardInterrupt (as Ctrl-C) when it starts sampling batch ``batches + 1``;
    returns the list of first indices it sampled."""
    sampled = []

    def counting(model, labels, **kwargs):
        if len(sampled) == batches:
            raise KeyboardInterrupt
        sampled.append(kwargs["first_index"])
        return REAL_SAMPLE(model, labels, **kwargs)

    monkeypatch.setattr(sample_cli, "sample", counting)
    return sampled


@pytest.mark.parametrize("extra", [[], ["--save-images"]], ids=["npz", "npz and PNGs"])
def test_an_interrupted_run_resumed_by_the_same_command_gives_the_same_bytes(extra, pixel_ckpt, tmp_path, run_cli,
                                                                            monkeypatch):
    command = ["sample", "--ckpt", pixel_ckpt, "--num-samples", "11", "--batch-size", "3", *FAST, *extra]
    assert run_cli([*command, "--out", str(tmp_path / "whole")]) == (0, [])

    resumed = tmp_path / "resumed"
    first = interrupted_after(monkeypatch, 2)
    assert run_cli([*command, "--out", str(resumed)])[0] == 130  # stopped as by Ctrl-C
    assert first == [0, 3] and not resumed.exists()
    [staging] = staging_folders(tmp_path)  # kept: it holds two finished batches
    assert sorted(os.listdir(tmp_path / staging / "batches")) == [  # each with the sha256 it is read back against
        "0000000.npy", "0000000.npy.sha256", "0000003.npy", "0000003.npy.sha256"]
    second = interrupted_after(monkeypatch, 100)
    assert run_cli([*command, "--out", str(resumed)]) == (0, [])
    assert second == [6, 9]  # only the missing batches
    assert staging_folders(tmp_path) == []

    pngs = [f"images/{name}" for name in os.listdir(tmp_path / "whole" / "images")] if extra else []
    for name in ["samples.npz", "grid.png", *pngs]:
        assert (resumed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    whole, again = (json.loads((tmp_path / name / "run.json").read_text()) for name in ("whole", "resumed"))
    assert again["identity"] == whole["identity"] and again["timings"]["resumed_images"] == 6
    assert sorted(os.listdir(resumed)) == sorted(os.listdir(tmp_path / "whole"))


def test_another_command_does_not_discard_a_partial_run_unless_restart(pixel_ckpt, tmp_path, run_cli, monkeypatch):
    out = tmp_path / "out"
    command = ["sample", "--ckpt", pixel_ckpt, "--batch-size", "2", "--out", str(out), *FAST]
    interrupted_after(monkeypatch, 1)
    assert run_cli([*command, "--num-samples", "6"])[0] == 130  # stopped as by Ctrl-C
    [staging] = staging_folders(tmp_path)
    sampled = interrupted_after(monkeypatch, 100)
    code, err = run_cli([*command, "--num-samples", "4", "--seed", "1"])
    assert code == 2 and len(err) == 1 and sampled == [], err
    assert err[0].startswith(f"fastdit sample: error: --out {out}: {tmp_path / staging} holds the partial output of "
                             "a killed run of another command (1 of 3 batches done; it differs in labels ")
    assert "num_samples (6 there, 4 here), seed (0 there, 1 here)" in err[0]
    assert err[0].endswith("rerun that command to finish it, or pass --restart to discard it")
    assert staging_folders(tmp_path) == [staging] and not out.exists()

    assert run_cli([*command, "--num-samples", "4", "--seed", "1", "--restart"]) == (0, [])
    assert sampled == [0, 2] and staging_folders(tmp_path) == []
    # --restart discards this command's own partial run too: everything is sampled again.
    interrupted_after(monkeypatch, 1)
    assert run_cli([*command, "--num-samples", "4"])[0] == 130  # stopped as by Ctrl-C
    sampled = interrupted_after(monkeypatch, 100)
    assert run_cli([*command, "--num-samples", "4", "--restart"]) == (0, [])
    assert sampled == [0, 2]


def test_leftovers_that_cannot_or_need_not_resume_are_removed(pixel_ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    command = ["sample", "--ckpt", pixel_ckpt, "--num-samples", "2", "--out", str(out), *FAST]
    assert run_cli(command) == (0, [])
    key = json.loads((out / "run.json").read_text())["identity"]
    # This run's folder after its swap (killed before removing it), an older fastdit's (no resume.json), a
    # folder killed before its first batch, and one whose resume.json is damaged.
    finished = tmp_path / f".out.staging-{key}"
    (finished / "batches").mkdir(parents=True)
    (finished / "batches" / "0000000.npy").write_bytes(b"")
    (finished / "resume.json").write_text(json.dumps({"format": sample_output.STAGING_FORMAT, "key": key}))
    (tmp_path / ".out.staging-old_1").mkdir()
    (tmp_path / ".out.staging-empty" / "batches").mkdir(parents=True)
    (tmp_path / ".out.staging-empty" / "resume.json").write_text(json.dumps({"format": 1, "key": "empty"}))
    (tmp_path / ".out.staging-torn" / "batches").mkdir(parents=True)
    (tmp_path / ".out.staging-torn" / "batches" / "0000000.npy").write_bytes(b"")
    (tmp_path / ".out.staging-torn" / "resume.json").write_text("{half")
    assert run_cli([*command, "--seed", "1"]) == (0, [])
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_a_rank_that_cannot_see_the_staging_folder_says_why(tmp_path):
    staging = sample_output.Staging(str(tmp_path / ".out.staging-abc"), "abc")
    with pytest.raises(OSError, match="rank 3 cannot see the staging folder .* a filesystem they all share"):
        staging.check_visible(3)


def test_a_damaged_batch_file_is_found_by_its_checksum_and_sampled_again(pixel_ckpt, tmp_path, run_cli, monkeypatch):
    out = tmp_path / "out"
    command = ["sample", "--ckpt", pixel_ckpt, "--num-samples", "4", "--batch-size", "2", "--out", str(out), *FAST]
    interrupted_after(monkeypatch, 1)
    assert run_cli(command)[0] == 130  # stopped as by Ctrl-C
    [staging] = staging_folders(tmp_path)
    damaged = tmp_path / staging / "batches" / "0000000.npy"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1  # one bit of a pixel: the file's size and header still look right
    damaged.write_bytes(bytes(data))
    sampled = interrupted_after(monkeypatch, 100)
    code, err = run_cli(command)
    assert code == 0 and err == [f"warning: the batch file {damaged} is damaged (its sha256 differs from the one "
                                 "recorded when it was written); sampling it again"]
    assert sampled == [0, 2]  # the damaged batch again, and the one the stopped run never reached
    assert run_cli([*command[:-len(FAST) - 2], "--out", str(tmp_path / "whole"), *FAST]) == (0, [])
    with np.load(out / "samples.npz") as resumed, np.load(tmp_path / "whole" / "samples.npz") as whole:
        np.testing.assert_array_equal(resumed["arr_0"], whole["arr_0"])


PEAK_TRACED = """
import sys, tracemalloc
from fastdit.cli import main
tracemalloc.start()
assert main(sys.argv[1:]) == 0
print(tracemalloc.get_traced_memory()[1])
"""


def test_memory_does_not_grow_with_the_number_of_images(tmp_path_factory, tmp_path):
    """numpy's buffers are traced by tracemalloc: the images a run holds show in its peak. 32x32 RGB images,
    3 KB each: 1,024 of them would add 2.8 MB to the peak (twice that with np.savez's copy)."""
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pixel32.pt", in_channels=3, input_size=32,
                                patch_size=8)

    # On the torch path: the Triton interpreter's numpy buffers would fill tracemalloc's record.
    env = torch_path_environment(OMP_NUM_THREADS="1")

    def peak_bytes(count):
        result = subprocess.run([sys.executable, "-c", PEAK_TRACED, "sample", "--ckpt", ckpt, "--batch-size", "64",
                                 "--num-samples", str(count), "--out", str(tmp_path / str(count)), *FAST],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1])

    small, large = peak_bytes(128), peak_bytes(1024)
    images_bytes = (1024 - 128) * 32 * 32 * 3
    # What grows: the labels (8 B per image), the list of batches and the digest of the labels.
    assert large - small < 0.1 * images_bytes, (small, large, images_bytes)
    with np.load(tmp_path / "1024" / "samples.npz", mmap_mode="r") as data:
        assert data["arr_0"].shape == (1024, 32, 32, 3)


PEAK_RSS = """
import resource, sys
from fastdit.cli import main
assert main(sys.argv[1:]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow  # 22,000 images of 64x64 in two subprocesses: about a minute on 2 cores
def test_peak_rss_does_not_grow_with_the_number_of_images(tmp_path_factory, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pixel64.pt", in_channels=3, input_size=64,
                                patch_size=16)
    env = torch_path_environment(OMP_NUM_THREADS="1")

    def peak_kib(count):
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, "sample", "--ckpt", ckpt, "--num-samples", str(count),
                                 "--batch-size", "250", "--out", str(tmp_path / str(count)), *FAST],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1])

    small, large = peak_kib(2_000), peak_kib(20_000)
    images_kib = 18_000 * 64 * 64 * 3 // 1024  # 216,000 KiB more images in the larger run
    # Holding them would add at least that (twice, with np.savez's copy). Measured on 2 CPU cores: 789,504 KiB
    # at 2,000, 837,120 at 20,000 and 825,272 at 40,000 images: the allocator's noise, not growth.
    assert large - small < 0.3 * images_kib, (small, large)


# 10 steps make a batch take ~0.2 s on one thread: the kill, polled from this process, lands between the 15th
# and the 40th batch even on a loaded machine (at 2 steps that window was ~1 s, and a busy CI runner missed it).
RESUME_COMMAND = ["sample", "--sampler", "ddim", "--steps", "10", "--num-samples", "400", "--batch-size", "10",
                  "--save-images", "--no-progress"]


@pytest.mark.slow  # the bundled model, 400 images three times in subprocesses
def test_a_sigkilled_run_resumed_equals_an_uninterrupted_run(tmp_path):
    env = torch_path_environment(OMP_NUM_THREADS="1")

    def command(out):
        return [sys.executable, "-m", "fastdit", *RESUME_COMMAND, "--out", str(out)]

    whole = subprocess.run(command(tmp_path / "whole"), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed"
    run = subprocess.Popen(command(out), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300

    def finished_batches():
        folders = [tmp_path / name / "batches" for name in staging_folders(tmp_path)]
        # finished batches only: a batch is finished once its sha256 record is written, after its file
        return sum(name.endswith(".npy.sha256") for folder in folders if folder.is_dir() for name in os.listdir(folder))

    while run.poll() is None and finished_batches() < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert 15 <= finished_batches() < 40 and not out.exists(), "the kill did not land midway"
    resumed = subprocess.run(command(out), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "run.json").read_text())["timings"]["resumed_images"] >= 150
    for name in ["samples.npz", "grid.png"] + [f"images/{name}" for name in os.listdir(tmp_path / "whole" / "images")]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path)) == [".resumed.lock", ".whole.lock", "resumed", "whole"]


TORCHRUN_PORT = 29517


@pytest.mark.slow  # torchrun with two gloo processes: process-group start-up dominates
def test_two_torchrun_processes_write_what_one_process_writes(pixel_ckpt, tmp_path):
    env = torch_path_environment(OMP_NUM_THREADS="1")
    argv = ["sample", "--ckpt", pixel_ckpt, "--num-samples", "13", "--batch-size", "2", "--save-images",
            "--device", "cpu", *FAST]
    one = subprocess.run([sys.executable, "-m", "fastdit", *argv, "--out", str(tmp_path / "one")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(TORCHRUN_PORT), "-m", "fastdit", *argv, "--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr
    for name in ["samples.npz", "grid.png"] + [f"images/{name}" for name in os.listdir(tmp_path / "one" / "images")]:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["sampling"]["world_size"] == 2
    assert record["identity"] == json.loads((tmp_path / "one" / "run.json").read_text())["identity"]


def test_a_diffusers_pipeline_root_brings_its_vae(tmp_path, run_cli):
    """--ckpt <pipeline root>: the transformer is the model, and vae/ decodes its samples (no --vae)."""
    diffusers = pytest.importorskip("diffusers")

    from fastdit.integrations.diffusers_folders import write_diffusers
    from fastdit.models.vae import VAE

    torch.manual_seed(0)
    root = tmp_path / "pipeline"
    model = fastdit.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                        num_classes=10)
    write_diffusers(model, root / "transformer")
    autoencoder = diffusers.AutoencoderKL(  # four blocks: latents at 1/8 of the image size, as DiT's VAE
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.5,
    )
    autoencoder.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": [
        "diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--ckpt", str(root), "--classes", "1", "2", "--out", str(out), *FAST])
    assert (code, err) == (0, [])
    record = json.loads((out / "run.json").read_text())
    assert record["vae"] == {"path": str(root / "vae"), "scale": 0.5}  # the scale from vae/config.json
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (2, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert np.asarray(Image.open(out / "grid.png")).ndim == 3
    assert VAE.load(root / "vae").scale == 0.5


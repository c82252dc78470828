"""The multi-node torchrun form (docs/scale.md): two launchers, one "node" each, meeting through a c10d
rendezvous on this machine, gloo between the processes. `fastdit encode`, `train` and `sample` started so
give what one process gives: the same shard bytes, the same weights (to the all-reduce's rounding) and the
same images. On a real cluster each launcher runs on its own machine with the same command, the
rendezvous endpoint being one of them; here they share one, and each node's process is LOCAL_RANK 0."""
import os
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from fastdit.cli import main
from fastdit.train import shards


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def two_nodes(*command, cwd, timeout=400):
    """``fastdit <command>`` under two torchrun launchers of one process each (--nnodes 2), as two
    machines would start it; both must succeed. Returns their stdouts, in no particular order."""
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"localhost:{free_port()}", "--rdzv_id", uuid.uuid4().hex[:12]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "fastdit",
                                   *command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=timeout))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for launcher, (stdout, stderr) in zip(launchers, outputs):
        assert launcher.returncode == 0, stdout + stderr
    return [stdout for stdout, _ in outputs]


@pytest.fixture
def vae_dir(tmp_path):
    """A tiny random AutoencoderKL, as tests/train/test_encode.py builds it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    autoencoder = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    autoencoder.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def make_folder(directory, per_class=(5, 4, 3)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, count in enumerate(per_class):
        os.makedirs(directory / f"class{label}")
        for index in range(count):
            width, height = rng.integers(12, 60, 2)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / f"class{label}" / f"{index:03d}.jpg", quality=90)
    return directory


@pytest.mark.slow
def test_encode_on_two_nodes_gives_the_single_process_bytes(vae_dir, tmp_path):
    folder = make_folder(tmp_path / "images")

    def command(out):
        return ["encode", "--data", str(folder), "--vae", str(vae_dir), "--out", str(out), "--image-size", "16",
                "--batch-size", "2", "--shard-size", "3", "--workers", "0", "--device", "cpu"]

    assert main(command(tmp_path / "one")) == 0
    two_nodes(*command(tmp_path / "two"), cwd=tmp_path)
    names = sorted(name for name in os.listdir(tmp_path / "one") if name.endswith(".npy") or name == shards.MANIFEST)
    assert len(names) == 4 * 3 + 1  # four shards of three files, and the manifest
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


@pytest.mark.slow
def test_train_on_two_nodes_equals_one_process(tmp_path):
    command = ["train", "--preset", "digits", "--steps", "3", "--ckpt-every", "3", "--log-every", "1",
               "--device", "cpu", "--deterministic", "--no-progress"]
    assert main([*command, "--out", str(tmp_path / "one")]) == 0
    two_nodes(*command, "--out", str(tmp_path / "two"), cwd=tmp_path)
    one, two = (torch.load(tmp_path / run / "checkpoints" / f"{3:08d}.pt", weights_only=True) for run in ("one", "two"))
    assert len(two["rng"]) == 2  # two ranks saved their states: the run was split
    for name in ("model", "ema"):
        for key, value in one[name].items():
            # The gradient all-reduce sums the ranks' halves in another order than one process's mean.
            torch.testing.assert_close(two[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


@pytest.mark.slow
def test_sample_on_two_nodes_gives_the_single_process_images(tmp_path):
    # The bundled digits model; 7 images in batches of 2: the two ranks take unequal shares.
    command = ["sample", "--num-samples", "7", "--batch-size", "2", "--steps", "4", "--device", "cpu",
               "--dtype", "fp32", "--no-progress"]
    assert main([*command, "--out", str(tmp_path / "one")]) == 0
    two_nodes(*command, "--out", str(tmp_path / "two"), cwd=tmp_path)
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert sorted(one) == sorted(two)
        assert one["arr_0"].shape[0] == 7
        for key in one:
            np.testing.assert_array_equal(two[key], one[key], err_msg=key)

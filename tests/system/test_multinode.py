"""The multi-node torchrun form (docs/scale.md): two launchers, one "node" each, meeting through a c10d
rendezvous on this machine, gloo between the processes. `fastdit encode`, `train` and `sample` started so
give what one process gives: the same shard bytes, the same weights (to the all-reduce's rounding) and the
same images. On a real cluster each launcher runs on its own machine with the same command, the
rendezvous endpoint being one of them; here they share one, and each node's process is LOCAL_RANK 0."""
import os
import re
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from image_data import make_image_folder, save_tiny_vae

from fastdit.cli import main
from fastdit.train import shards


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def launch_two_nodes(commands, cwd, timeout=400):
    """``fastdit <command>`` under two torchrun launchers of one process each (--nnodes 2), as two
    machines would start it, one command each. Returns [(returncode, stdout, stderr)], in launch order."""
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"localhost:{free_port()}", "--rdzv_id", uuid.uuid4().hex[:12]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "fastdit",
                                   *command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append((*launcher.communicate(timeout=timeout),))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    return [(launcher.returncode, stdout, stderr) for launcher, (stdout, stderr) in zip(launchers, outputs)]


def two_nodes(*command, cwd, timeout=400):
    """The same command on both "machines"; both must succeed. Returns their stdouts."""
    results = launch_two_nodes([command, command], cwd, timeout)
    for returncode, stdout, stderr in results:
        assert returncode == 0, stdout + stderr
    return [stdout for _, stdout, _ in results]


def errors_of(results, command):
    """The failed launchers' ``fastdit <command>: error:`` lines."""
    assert all(returncode != 0 for returncode, _, _ in results), results
    return {line for _, _, stderr in results for line in stderr.splitlines()
            if line.startswith(f"fastdit {command}: error:")}


@pytest.fixture
def vae_dir(tmp_path):
    return save_tiny_vae(tmp_path / "vae")


@pytest.mark.slow
def test_encode_on_two_nodes_gives_the_single_process_bytes(vae_dir, tmp_path):
    folder = make_image_folder(tmp_path / "images")

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


@pytest.mark.slow
def test_an_out_folder_each_machine_keeps_to_itself_is_one_error(tmp_path):
    """Each "machine" given its own --out, as a machine-local disk would be: rank 0 would wait for shards it
    never sees, and the ranks of a training run would resume from different checkpoints."""
    command = ["train", "--preset", "digits", "--steps", "1", "--device", "cpu", "--no-progress"]
    results = launch_two_nodes([[*command, "--out", str(tmp_path / f"node{node}")] for node in range(2)], tmp_path)
    (error,) = errors_of(results, "train")
    assert re.fullmatch(r"fastdit train: error: --out: rank 1 \(on .+\) does not see the folder '.*node\d' that "
                        r"rank 0 \(on .+\) writes to; with several machines, put it on a filesystem every machine "
                        r"mounts at the same path", error), error
    # Rank 0's folder (whichever "machine" it was on) keeps no marker; the other rank created none.
    folders = [tmp_path / f"node{node}" for node in range(2) if os.path.isdir(tmp_path / f"node{node}")]
    assert len(folders) == 1 and not [name for name in os.listdir(folders[0]) if name.endswith(".tmp")]


@pytest.mark.slow
def test_machines_with_different_copies_of_the_shards_are_one_error(tmp_path):
    rng = np.random.default_rng(0)
    for node in range(2):  # each machine's copy of "the" shards; the second holds other values
        arrays = {"latents": rng.standard_normal((16, 1, 16, 16), np.float32),
                  "flipped": rng.standard_normal((16, 1, 16, 16), np.float32), "labels": rng.integers(0, 10, 16)}
        os.makedirs(tmp_path / f"copy{node}")
        records = [shards.write_shard(tmp_path / f"copy{node}", 0, arrays, "fp16", {"latent_dtype": "fp16"})]
        shards.write_manifest(tmp_path / f"copy{node}", records, 10, {"latent_dtype": "fp16"})
    command = ["train", "--preset", "digits", "--steps", "1", "--device", "cpu", "--no-progress", "--workers", "0",
               "--out", str(tmp_path / "run")]
    results = launch_two_nodes([[*command, "--data", str(tmp_path / f"copy{node}")] for node in range(2)], tmp_path)
    (error,) = errors_of(results, "train")
    assert re.fullmatch(r"fastdit train: error: data: rank 1's .*copy\d/manifest.json differs from rank 0's "
                        r"\(sha256 \w+ against \w+\): the machines hold different encodes; copy rank 0's shard "
                        r"folder to every machine", error), error


@pytest.mark.slow
def test_machines_that_list_different_images_are_one_error(vae_dir, tmp_path):
    """Each machine lists its own --data: a copy with an image missing would make rank 0 wait for shards of
    its own listing that never come."""
    full = make_image_folder(tmp_path / "full")
    short = make_image_folder(tmp_path / "short")
    os.remove(short / "class0" / "004.jpg")
    command = ["encode", "--vae", str(vae_dir), "--out", str(tmp_path / "out"), "--image-size", "16",
               "--batch-size", "2", "--shard-size", "3", "--workers", "0", "--device", "cpu"]
    results = launch_two_nodes([[*command, "--data", str(folder)] for folder in (full, short)], tmp_path)
    (error,) = errors_of(results, "encode")
    assert re.fullmatch(r"fastdit encode: error: --data: rank 1 sees another encode than rank 0 \(images 1[12] "
                        r"\(rank 0: 1[12]\), files_sha256 '\w+' \(rank 0: '\w+'\)\); every machine must see the same "
                        r"image folder and VAE", error), error
    assert not [name for name in os.listdir(tmp_path / "out") if name.startswith("shard-")]

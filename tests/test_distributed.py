"""fastdit.distributed alone and in a gloo group of CPU processes started by torchrun, and `fastdit sample`
under torchrun giving the single-process run's samples exactly."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastdit import distributed
from fastdit.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(nproc, *command, cwd):
    result = subprocess.run([*TORCHRUN, "--nproc_per_node", str(nproc), *command], cwd=cwd,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("count", range(0, 11))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_splits_in_order_and_evenly(count, world_size):
    pieces = [distributed.shard(count, rank, world_size) for rank in range(world_size)]
    assert [index for piece in pieces for index in piece] == list(range(count))
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_single_process_needs_no_group(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun() and distributed.is_main_process()
    with distributed.launch("cpu") as process:
        assert process == distributed.Process(0, 1, 0, torch.device("cpu"), None) and process.is_main
        array = np.arange(6).reshape(3, 2)
        assert distributed.gather_to_main(array, process) is array
        assert distributed.fail_together(lambda: "checked", process) == "checked"
        with pytest.raises(ValueError, match="own error"):
            distributed.fail_together(lambda: int("own error"), process)
    assert not torch.distributed.is_initialized()


def test_device_errors():
    with pytest.raises(ValueError, match="device: expected a torch device such as cpu, cuda or cuda:1, got 'gpu0'"):
        distributed.resolve_device("gpu0")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="each uses cuda:LOCAL_RANK"):
            distributed.resolve_device("cuda:0", local_rank=1, world_size=2)
        assert distributed.resolve_device("cuda", local_rank=0, world_size=2) == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match="needs CUDA, which this machine does not have"):
            distributed.resolve_device("cuda")


WORKER = textwrap.dedent("""
    import json
    import numpy as np
    from fastdit import distributed

    with distributed.launch("cpu") as process:
        rows = {0: 2, 1: 0, 2: 3}[process.rank]  # rank 1 has no work: its piece is empty, of any shape
        piece = np.full((rows, 2, 3), process.rank, np.int64) if rows else np.empty(0)
        gathered = distributed.gather_to_main(piece, process)
        try:
            distributed.fail_together(lambda: 1 // (process.rank != 2), process)  # fails on rank 2 only
            failed = None
        except ZeroDivisionError as error:
            failed = str(error)
        if process.is_main:
            print("RESULT " + json.dumps({"backend": process.backend, "world_size": process.world_size,
                                          "gathered": gathered.tolist(), "failed": failed}))
        else:
            assert gathered is None and failed is not None
""")


@pytest.mark.slow
def test_gather_and_fail_together_in_a_gloo_group(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    stdout = torchrun(3, "worker.py", cwd=tmp_path)
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert result["backend"] == "gloo" and result["world_size"] == 3
    expected = np.concatenate([np.full((2, 2, 3), 0), np.full((3, 2, 3), 2)])
    np.testing.assert_array_equal(np.array(result["gathered"]), expected)
    assert result["failed"] == "integer division or modulo by zero"  # rank 2's error, raised on rank 0 too


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")),
])
def test_torchrun_sample_equals_single_process(device, tmp_path):
    from parity import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "pixel.pt", in_channels=3, input_size=8, patch_size=4)
    # 5 images in batches of 2: rank 0 samples images 0-3, rank 1 image 4; DDPM draws noise every step.
    argv = ["sample", "--ckpt", ckpt, "--num-samples", "5", "--batch-size", "2", "--sampler", "ddpm", "--steps", "3",
            "--device", device, "--dtype", "fp32", "--no-progress"]
    torchrun(2, "-m", "fastdit", *argv, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0

    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert sorted(one) == sorted(two) == ["arr_0", "labels"]
        for key in one:
            np.testing.assert_array_equal(one[key], two[key])
    assert json.loads((tmp_path / "two" / "run.json").read_text())["sampling"]["world_size"] == 2
    assert sorted(os.listdir(tmp_path / "two")) == ["grid.png", "run.json", "samples.npz"]

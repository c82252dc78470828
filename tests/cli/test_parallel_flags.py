"""`torchrun ... fastdit sample --parallel cfg|sp|cfg+sp` writes the single-process run's samples; bad --parallel
values are one line before any work."""
import json
import subprocess
import sys

import numpy as np
import pytest
from processes import torch_path_environment

from fastdit.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(nproc, argv, cwd):
    # The fused ops' plain torch path in the workers: 4 processes interpreting every kernel (CI's TRITON_INTERPRET)
    # would take many minutes on 2 cores, and the kernels are checked on their own.
    env = torch_path_environment()
    return subprocess.run([*TORCHRUN, "--nproc_per_node", str(nproc), "-m", "fastdit", *argv], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, mode", [(2, "cfg"), (2, "sp"), (4, "cfg+sp"), (4, "sp:2")])
def test_parallel_sample_equals_single_process(nproc, mode, tmp_path):
    from parity import save_tiny_checkpoint

    # 9 tokens (a 12 x 12 image in 4 x 4 patches): padded over 2 ranks; 6 heads
    ckpt = save_tiny_checkpoint(tmp_path / "pixel.pt", in_channels=3, input_size=12, patch_size=4)
    argv = ["sample", "--ckpt", ckpt, "--num-samples", "3", "--batch-size", "2", "--sampler", "ddpm", "--steps", "3",
            "--cfg-scale", "4", "--device", "cpu", "--dtype", "fp32", "--no-progress"]
    result = torchrun(nproc, [*argv, "--parallel", mode, "--out", str(tmp_path / "many")], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "many" / "samples.npz") as many:
        assert sorted(one) == sorted(many)
        np.testing.assert_array_equal(one["labels"], many["labels"])
        # uint8 images from fp32 samples within 1e-5: a pixel may round the other way, by one level
        assert np.abs(one["arr_0"].astype(int) - many["arr_0"].astype(int)).max() <= 1
    assert json.loads((tmp_path / "many" / "run.json").read_text())["sampling"]["world_size"] == nproc


@pytest.mark.slow
@pytest.mark.parametrize("nproc, flags, message", [
    (3, ["--parallel", "cfg"], "parallel cfg: the cfg degree 2 must divide the world size, got 3 processes"),
    (2, ["--parallel", "sp", "--cuda-graphs"], "--parallel sp: --cuda-graphs is not supported with cfg or sp"),
    (2, ["--parallel", "sp", "--cache", "fora"], "--parallel sp: --cache is not supported with cfg or sp"),
    (4, ["--parallel", "sp"], "the sp degree must divide the model's attention heads, got degree 4 for 6 heads"),
])
def test_bad_parallel_one_line(nproc, flags, message, tmp_path):
    from parity import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "pixel.pt", in_channels=3, input_size=8, patch_size=4)
    result = torchrun(nproc, ["sample", "--ckpt", ckpt, "--num-samples", "2", "--steps", "2", "--device", "cpu",
                              "--no-progress", *flags, "--out", str(tmp_path / "out")], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("fastdit sample: error:")]
    assert lines and message in lines[0], result.stderr[-3000:]

"""`fastdit evaluate`: the report printed and written, one line for each bad flag, and torchrun's ranks giving the
numbers of one process."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from processes import torch_path_environment

from fastdit.cli import main
from fastdit.evaluation.extractors import digit_images
from fastdit.io import write_npz_streamed


@pytest.fixture
def digit_samples(tmp_path, monkeypatch):
    """2,100 noisy real digits (three feature chunks of 1,024) with their labels, as a samples.npz."""
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    images, labels = digit_images()
    index = np.arange(2100) % len(images)
    noise = np.random.default_rng(0).integers(-20, 21, (2100, 8, 8))
    samples = np.clip(images[index].astype(int) + noise, 0, 255).astype(np.uint8)
    write_npz_streamed(tmp_path / "samples.npz", {"images": samples, "labels": labels[index], "arr_0": samples})
    return tmp_path / "samples.npz"


def test_evaluate_digits_prints_and_writes_the_report(digit_samples, tmp_path, run_cli, capsys):
    code, errors = run_cli(["evaluate", str(digit_samples), "--digits", "--workers", "0", "--out",
                            str(tmp_path / "report.json")])
    assert code == 0, errors
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["count"] == 2100 and report["sfid"] is None
    assert report["accuracy"] > 0.9 and report["fid"] > 0 and 0 < report["precision"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["ref.npz", "--digits"], "REF: expected a reference batch, or --digits, not both"),
    ([], r"REF: expected a reference batch .npz \(or --digits\)"),
    (["--digits", "--batch-size", "0"], r"--batch-size: expected an integer in \[1, 65536\], got 0"),
    (["--digits", "--workers", "-1"], r"--workers: expected an integer in \[0, 256\], got -1"),
    (["--digits", "--workers", "100000"], r"--workers: expected an integer in \[0, 256\], got 100000"),
    (["--digits", "--device", "tpu"], "--device: expected a torch device"),
])
def test_bad_flags_are_one_line(argv, message, run_cli, tmp_path):
    code, errors = run_cli(["evaluate", str(tmp_path / "samples.npz"), *argv])
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("fastdit evaluate: error: ") and re.search(message, errors[0])


@pytest.mark.slow
def test_torchrun_ranks_give_the_numbers_of_one_process(digit_samples, tmp_path):
    environment = torch_path_environment(FASTDIT_CACHE=str(tmp_path / "cache"))
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"report-{nproc}.json"
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 str(nproc), "-m", "fastdit", "evaluate", str(digit_samples), "--digits", "--workers",
                                 "1", "--out", str(out)], capture_output=True, text=True, timeout=300,
                                env=environment, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        reports[nproc] = json.loads(out.read_text())
    assert reports[1] == reports[2]


def test_sample_evaluate_chains_the_two(tmp_path, capsys, monkeypatch):
    from parity import save_tiny_checkpoint

    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    ckpt = save_tiny_checkpoint(tmp_path / "grey.pt", in_channels=1, input_size=8, patch_size=4)
    out = tmp_path / "out"
    assert main(["sample", "--ckpt", str(ckpt), "--num-samples", "6", "--sampler", "ddim", "--steps", "2", "--device",
                 "cpu", "--no-progress", "--out", str(out), "--evaluate", "digits"]) == 0
    chained = capsys.readouterr().out.splitlines()
    assert main(["evaluate", str(out), "--digits"]) == 0
    alone = capsys.readouterr().out.splitlines()
    fid = [line for line in chained if line.startswith("FID (digits features): ")]
    assert len(fid) == 1 and fid == [line for line in alone if line.startswith("FID")]
    assert not [path.name for path in tmp_path.iterdir() if ".features-" in path.name]  # removed once summarised


def test_sample_evaluate_checks_ref_before_sampling(tmp_path, run_cli):
    code, errors = run_cli(["sample", "--model", "DiT-S/8", "--evaluate", str(tmp_path / "ref.npz"), "--out",
                            str(tmp_path / "out")])
    assert code == 2 and errors == [f"fastdit sample: error: REF {tmp_path / 'ref.npz'}: no such file; expected an "
                                    ".npz reference batch (ADM's VIRTUAL_imagenet256_labeled.npz and the like) or a "
                                    "samples.npz"]
    assert not (tmp_path / "out").exists()

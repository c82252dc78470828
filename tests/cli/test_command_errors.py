"""Bad input to `fastdit demo`, `fastdit export` and `fastdit digits-accuracy`: exit status 2, exactly one stderr line
`fastdit <command>: error: ...` naming the problem, no traceback, nothing written and no model built or compiled
first. In-process through ``fastdit.cli.main``; one case runs the console entry point in a subprocess, where the
real exit status and stderr are the point."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdit.cli import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def write_npz(name, **arrays):
    def make(root):
        np.savez(root / name, **arrays)
    return make


def write_text(name, text):
    def make(root):
        (root / name).write_text(text)
    return make


def make_directory(name):
    def make(root):
        (root / name).mkdir()
    return make


GREY = np.zeros((2, 16, 16, 1), np.uint8)
DIGITS = np.array([3, 4])

CASES = [
    (["demo", "--batch-size", "0"], None, "--batch-size: expected an integer >= 1, got 0"),
    (["demo", "--image-size", "-64"], None, "--image-size: expected an integer >= 1, got -64"),
    (["demo", "--image-size", "100"], None, "--image-size: DiT-S/2 takes images of a multiple of 16 px"),
    (["demo", "--repeats", "0"], None, "--repeats: expected an integer >= 1, got 0"),
    (["demo", "--model", "DiT-Q/2"], None, "--model: unknown model 'DiT-Q/2'; expected one of DiT-S/2"),
    pytest.param(["demo", "--device", "cuda"], None, "--device cuda: this machine has no CUDA device", marks=NO_CUDA),
    (["demo", "--device", "nonsense"], None, "--device: expected a torch device"),
    (["export", "--out", "old.pt2"], make_directory("old.pt2"), "--out old.pt2: old.pt2 is a directory"),
    (["export", "--out", "old"], make_directory("old"), "--out: expected a package path ending in .pt2"),
    (["export", "--out", "file/m.pt2"], write_text("file", "x"), "--out file/m.pt2: "),
    (["digits-accuracy", "notes.txt"], write_text("notes.txt", "not samples\n"), "notes.txt: not a NumPy .npz archive"),
    (["digits-accuracy", "missing.npz"], None, "missing.npz: no such file"),
    (["digits-accuracy", "."], None, ".: is a directory"),
    (["digits-accuracy", "x.npz"], write_npz("x.npz", x=np.zeros(3)),
     "x.npz: expected arrays arr_0 (the images) and labels, a pixel model's samples.npz of `fastdit sample`, but "
     "it has no arr_0 and no labels; it has x"),
    (["digits-accuracy", "l.npz"], write_npz("l.npz", latents=np.zeros((2, 4, 4, 4)), labels=DIGITS),
     "l.npz: expected arrays arr_0 (the images) and labels, a pixel model's samples.npz of `fastdit sample`, but "
     "it has no arr_0; it has latents, labels (a latent model's samples: digits-accuracy scores pixels)"),
    (["digits-accuracy", "o.npz"], write_npz("o.npz", arr_0=np.array([None, 1], dtype=object), labels=DIGITS),
     "o.npz: cannot read it as a NumPy .npz archive (Object arrays cannot be loaded"),
    (["digits-accuracy", "f.npz"], write_npz("f.npz", arr_0=GREY.astype(np.float32), labels=DIGITS),
     "f.npz: images: expected grey uint8 images of shape (N, H, W) or (N, H, W, 1), N >= 1 (a 1-channel pixel "
     "model's samples), got float32 of shape (2, 16, 16, 1)"),
    (["digits-accuracy", "rgb.npz"], write_npz("rgb.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8), labels=DIGITS),
     "rgb.npz: images: expected grey uint8 images"),
    (["digits-accuracy", "n.npz"], write_npz("n.npz", arr_0=GREY, labels=np.array([3, 4, 5])),
     "n.npz: labels: expected 2 integer labels, one per image, got int64 of shape (3,)"),
    (["digits-accuracy", "c.npz"], write_npz("c.npz", arr_0=GREY, labels=np.array([3, 12])),
     "c.npz: labels: expected digits in [0, 9], got [12]"),
]


@pytest.mark.parametrize("arguments, make, message", CASES)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, no_work, arguments, make, message):
    monkeypatch.chdir(tmp_path)
    if make is not None:
        make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(arguments) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastdit {arguments[0]}: error: {message}"), captured.err
    assert captured.out == "" and sorted(os.listdir(tmp_path)) == before


def test_the_console_command_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastdit", "demo", "--batch-size", "0"], check=False, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["fastdit demo: error: --batch-size: expected an integer >= 1, got 0"]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("argv, words", [
    # An impossible global batch ended in an allocator traceback (issue 27).
    (["train", "--preset", "digits", "--global-batch-size", "1000000000"], "--global-batch-size: expected an integer in "
                                                                           "[1, 65536], got 1000000000"),
    (["train", "--preset", "digits", "--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["train", "--preset", "digits", "--lr", "-1"], "--lr: expected a finite number > 0, got -1.0"),
    (["train", "--preset", "digits", "--steps", "0"], "--steps: expected an integer in [1, 1000000000], got 0"),
    (["train", "--preset", "digits", "--seed", "-1"], "--seed: expected an integer in [0, 4294967295], got -1"),
    (["train", "--preset", "digits", "--image-size", "100000"], "--image-size: expected an integer in [1, 4096]"),
    (["train", "--preset", "digits", "--workers", "-2"], "--workers: expected an integer in [0, 256], got -2"),
    (["encode", "--data", "d", "--vae", "v", "--shard-size", "0"], "--shard-size: expected an integer in [1, 10000000]"),
    (["encode", "--data", "d", "--vae", "v", "--workers", "100000"], "--workers: expected an integer in [0, 256]"),
    (["encode", "--data", "d", "--vae", "v", "--prefetch", "0"], "--prefetch: expected an integer in [1, 1024], got 0"),
    (["sample", "--seed", str(2**70)], f"--seed: expected an integer in [0, 4294967295], got {2**70}"),
    (["sample", "--batch-size", "100000000"], "--batch-size: expected an integer in [1, 65536], got 100000000"),
    (["sample", "--steps", "5000"], "--steps: expected an integer in [1, 1000], got 5000"),
])
def test_numeric_flags_out_of_range_name_the_range_before_any_work(argv, words, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli([*argv, "--out", "out"])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"fastdit {argv[0]}: error: {words}"), err
    assert os.listdir(tmp_path) == []

"""`fastdit sample`'s --out: a run's folder holds exactly that run's files, every output path is checked before
any work, two runs into one --out cannot mix (a real second process is refused, naming the holder), and a run
killed at any point leaves the complete old output or the complete new one."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from processes import torch_path_environment

import fastdit
import fastdit.io
from fastdit import images
from fastdit.cli import sample as sample_cli
from fastdit.cli import sample_output
from fastdit.diffusion.sampling import sample

FAST = ["--sampler", "ddim", "--steps", "2", "--no-progress"]


def assert_complete_output(out):
    """run.json, samples.npz and the PNGs are one run's: counts, labels and pixels agree. Returns run.json."""
    record = json.loads((out / "run.json").read_text())
    with np.load(out / "samples.npz") as data:
        labels, samples = data["labels"], data["arr_0"]
    count = record["sampling"]["num_samples"]
    assert len(labels) == len(samples) == count
    names = sorted(os.listdir(out / "images")) if (out / "images").exists() else []
    assert len(names) == record["outputs"]["images"]
    assert names == [f"{k:06d}_class{label}.png" for k, label in enumerate(labels)][:len(names)]
    for name, image in zip(names, samples):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / name)).reshape(image.shape), image)
    assert sorted(os.listdir(out)) == sorted(["grid.png", "run.json", "samples.npz"] + (["images"] if names else []))
    return record


def test_a_run_replaces_the_previous_output_whole(pixel_ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    argv = ["sample", "--ckpt", pixel_ckpt, "--save-images", "--out", str(out), *FAST]
    assert run_cli([*argv, "--num-samples", "10"])[0] == 0
    assert len(os.listdir(out / "images")) == 10
    assert run_cli([*argv, "--num-samples", "2", "--seed", "1"]) == (0, [])
    assert assert_complete_output(out)["sampling"]["num_samples"] == 2  # 2 PNGs, none of the first run's 10
    assert run_cli(["sample", "--ckpt", pixel_ckpt, "--out", str(out), "--num-samples", "3", *FAST])[0] == 0
    assert not (out / "images").exists()  # this run wrote no PNGs, so --out holds none
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_the_swap_without_renameat2_and_recovery_from_a_kill_between_its_renames(pixel_ckpt, tmp_path, run_cli,
                                                                                    monkeypatch):
    monkeypatch.setattr(fastdit.io, "exchange", lambda first, second: False)
    out = tmp_path / "out"
    argv = ["sample", "--ckpt", pixel_ckpt, "--save-images", "--out", str(out), *FAST]
    assert run_cli([*argv, "--num-samples", "4"])[0] == 0
    assert run_cli([*argv, "--num-samples", "2"])[0] == 0
    assert assert_complete_output(out)["sampling"]["num_samples"] == 2
    # A kill between the two renames: --out moved aside, the new output never renamed in.
    os.rename(out, tmp_path / ".out.previous-abc_123")
    os.makedirs(tmp_path / ".out.staging-abc_123")
    with sample_output.locked_output(str(out)) as path, sample_output.staging_folder(path, {"seed": 0}):
        pass  # what every run does first, under the lock
    assert assert_complete_output(out)["sampling"]["num_samples"] == 2
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_a_killed_runs_leftovers_are_removed_and_other_folders_left_alone(pixel_ckpt, tmp_path, run_cli):
    (tmp_path / ".out.staging-k1ll3d_").mkdir()
    (tmp_path / ".out.staging-k1ll3d_" / "samples.npz").write_bytes(b"half")
    (tmp_path / ".out.b.staging-other").mkdir()  # another --out's (out.b) staging: not ours to remove
    assert run_cli(["sample", "--ckpt", pixel_ckpt, "--out", str(tmp_path / "out"), "--num-samples", "1", *FAST])[0] == 0
    assert sorted(os.listdir(tmp_path)) == [".out.b.staging-other", ".out.lock", "out"]


@pytest.mark.parametrize("case, out, words", [
    ("empty", lambda tmp: "", "--out: expected a folder path, got ''"),
    ("blank", lambda tmp: "  ", "--out: expected a folder path, got '  '"),
    ("root", lambda tmp: "/", "the filesystem root cannot be replaced"),
    ("a file", lambda tmp: str(tmp / "a_file"), "is a file, not a directory"),
    ("under a file", lambda tmp: str(tmp / "a_file" / "out"), "is a file, not a directory"),
    ("a foreign folder", lambda tmp: str(tmp / "mine"), "holds files that no sample run wrote (notes.txt)"),
    ("foreign images", lambda tmp: str(tmp / "old"), "holds files that no sample run wrote (images/x.jpg)"),
    # PNGs a user put there (issue 27: they were deleted), also when named as a run names them but without the
    # run.json of a sample run
    ("foreign PNGs", lambda tmp: str(tmp / "photos"), "holds files that no sample run wrote (images/holiday.png)"),
    ("no run.json", lambda tmp: str(tmp / "album"), "holds files that no sample run wrote (images)"),
    ("another run.json", lambda tmp: str(tmp / "other"), "run.json (not a sample run's)"),
    # A run swaps its --out whole: a mount point cannot be renamed (issue 27: EBUSY after sampling everything)
    ("a mount point", lambda tmp: str(tmp / "mnt"), "is a mount point"),
])
def test_bad_output_paths_fail_before_any_work(case, out, words, pixel_ckpt, tmp_path, run_cli, monkeypatch,
                                               no_work):
    (tmp_path / "a_file").write_text("in the way")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "old" / "images").mkdir(parents=True)
    (tmp_path / "old" / "images" / "x.jpg").write_bytes(b"")
    for folder, name in (("photos", "holiday.png"), ("album", "000000_class1.png"), ("other", None), ("mnt", None)):
        (tmp_path / folder / "images").mkdir(parents=True)
        if name:
            (tmp_path / folder / "images" / name).write_bytes(b"a photo")
    (tmp_path / "other" / "run.json").write_text('{"someone": "else"}')
    mount_point, ismount = str(tmp_path / "mnt"), os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == mount_point or ismount(path))
    before = sorted(os.listdir(tmp_path))
    code, err = run_cli(["sample", "--ckpt", pixel_ckpt, "--save-images", "--out", out(tmp_path), *FAST])
    assert code == 2 and len(err) == 1 and err[0].startswith("fastdit sample: error: ") and words in err[0], err
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "photos" / "images" / "holiday.png").read_bytes() == b"a photo"


def test_a_huge_run_is_refused_before_allocating(pixel_ckpt, tmp_path, run_cli):
    started = time.perf_counter()
    code, err = run_cli(["sample", "--ckpt", pixel_ckpt, "--classes", "1", "2", "--num-per-class", "1000000000000",
                         "--out", str(tmp_path / "out"), *FAST])
    assert code == 2 and err == [("fastdit sample: error: --num-per-class: 2 classes x 1000000000000 = 2000000000000 "
                                  f"images; a run makes at most {sample_cli.MAX_NUM_SAMPLES}: split it into runs "
                                  "with different --seed")]
    code, err = run_cli(["sample", "--ckpt", pixel_ckpt, "--num-samples", str(10**12), "--out", str(tmp_path / "o"),
                         *FAST])
    assert code == 2 and len(err) == 1 and "--num-samples: a run makes at most" in err[0]
    assert time.perf_counter() - started < 5 and os.listdir(tmp_path) == []


# Holds --out's lock as a sample run does, and says so on stdout.
HOLDER = """
import sys, time
from fastdit.cli import sample_output
with sample_output.locked_output(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_the_same_out_is_refused_naming_the_holder(pixel_ckpt, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        second = subprocess.run([sys.executable, "-m", "fastdit", "sample", "--ckpt", pixel_ckpt, "--out", str(out),
                                 "--num-samples", "1", *FAST], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    assert second.stderr.splitlines() == [(f"fastdit sample: error: --out {out} is in use by another fastdit process "
                                           f"(pid {holder.pid}); wait for it to finish or choose another folder")]
    assert not out.exists()
    # The kernel dropped the killed holder's lock: the next run proceeds.
    third = subprocess.run([sys.executable, "-m", "fastdit", "sample", "--ckpt", pixel_ckpt, "--out", str(out),
                            "--num-samples", "1", *FAST], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A checkpoint as fastdit's trainer writes it (OUT/checkpoints/00000000.pt), EMA and raw weights apart."""
    from parity import perturb_

    from fastdit import distributed
    from fastdit.train.trainer import TrainConfig, Trainer

    config = TrainConfig(out=str(tmp_path_factory.mktemp("run")), model=None, data="digits", image_size=8,
                         model_config=dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1,
                                           num_heads=2, num_classes=10, class_dropout_prob=0.1, learn_sigma=True))
    trainer = Trainer(config, distributed.Process(0, 1, 0, torch.device("cpu"), None))
    perturb_(trainer.model, seed=1)
    perturb_(trainer.ema, seed=2)
    trainer.save()
    return os.path.join(trainer.checkpoint_dir, "00000000.pt")


@pytest.mark.parametrize("weights", [None, "ema", "model"])
def test_fastdits_own_training_checkpoint(training_checkpoint, weights, tmp_path, run_cli):
    out = tmp_path / "out"
    flags = [] if weights is None else ["--weights", weights]
    code, err = run_cli(["sample", "--ckpt", training_checkpoint, *flags, "--classes", "3", "5", "--out", str(out),
                         *FAST])
    assert (code, err) == (0, [])
    model = fastdit.load(training_checkpoint, weights=weights or "ema")
    expected = sample(model, [3, 5], sampler="ddim", steps=2, cfg_scale=4.0, seed=0)
    with np.load(out / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images.to_uint8(expected))
    assert json.loads((out / "run.json").read_text())["arguments"]["weights"] == weights


def test_nonfinite_weights_fail_in_one_line(pixel_ckpt, tmp_path, run_cli):
    state_dict = torch.load(pixel_ckpt)
    state_dict["final_layer.linear.weight"][0, 0] = float("nan")
    torch.save(state_dict, tmp_path / "nan.pt")
    code, err = run_cli(["sample", "--ckpt", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "out"), *FAST])
    assert code == 2 and len(err) == 1
    assert re.search(r"the weights are not finite: final_layer\.linear\.weight holds 1 NaN", err[0]), err
    assert "allow_nonfinite" not in err[0] and "pass an earlier checkpoint" in err[0]  # the CLI user's options
    assert not (tmp_path / "out").exists()


def staging_folders(parent):
    return [parent / name for name in os.listdir(parent) if name.startswith(".out.staging-")]


def staging_holds(parent, test):
    return any(test(folder) for folder in staging_folders(parent))


# Points of a run, seen from outside: while it samples (its staging folder made, no batch finished yet), while
# it writes PNGs, once samples.npz is being written, once run.json is (the swap is next).
def in_output(test):
    return lambda parent: staging_holds(parent, lambda folder: (folder / "output").is_dir()
                                        and test(folder / "output"))


KILL_POINTS = {
    "sampling": lambda parent: staging_holds(parent, lambda folder: (folder / "batches").is_dir()
                                             and not os.listdir(folder / "batches")),
    "pngs": in_output(lambda output: (output / "images").is_dir() and len(os.listdir(output / "images")) >= 20),
    "samples.npz": in_output(lambda output: any("samples.npz" in name for name in os.listdir(output))),
    "run.json": in_output(lambda output: any("run.json" in name for name in os.listdir(output))),
}


@pytest.mark.slow  # about a dozen runs of the bundled model in subprocesses
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_run_killed_at_any_point_leaves_the_old_output_or_the_new_one(signal_number, tmp_path):
    env = torch_path_environment(OMP_NUM_THREADS="1")
    out = tmp_path / "out"

    def command(seed):  # the bundled model, 100 images and their PNGs: a write phase long enough to land in;
        # --restart: each run has another seed, and discards the batches the killed one kept
        return [sys.executable, "-m", "fastdit", "sample", "--sampler", "ddim", "--steps", "3", "--save-images",
                "--seed", str(seed), "--out", str(out), "--no-progress", "--restart"]

    first = subprocess.run(command(0), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    current = 0
    for seed, (point, reached) in enumerate(KILL_POINTS.items(), start=1):
        run = subprocess.Popen(command(seed), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while run.poll() is None and not reached(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        if point == "sampling":
            time.sleep(0.5)  # into loading or sampling, past the instant the staging folder is made
        run.send_signal(signal_number)
        run.wait(timeout=120)
        record = assert_complete_output(out)
        # Either output is whole: the old one, or (on a fast machine the run may swap in before the signal
        # lands, at any point) the new one.
        assert record["arguments"]["seed"] in (current, seed), point
        if record["arguments"]["seed"] == current:  # stopped before the swap: the old output, untouched. (A
            # SIGINT ends the command with its one line and 130; one inside safetensors' reader comes out as its
            # ValueError: exit 2, one line.)
            assert run.returncode in (-signal_number, 128 + signal_number, 2), point
        current = record["arguments"]["seed"]
        if signal_number == signal.SIGINT:  # an interrupted run keeps its staging folder only to resume it
            assert all(os.listdir(folder / "batches") for folder in staging_folders(tmp_path)), point
    last = subprocess.run(command(99), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    assert assert_complete_output(out)["arguments"]["seed"] == 99
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]  # what the killed runs left is gone

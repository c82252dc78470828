"""Stopping the long commands (issue 27): SIGINT and SIGTERM end a command with one line that says what was
kept and how to resume (exit 130 and 143), SIGKILL as well leaves no process of its tree behind (DataLoader
workers, their fork server and resource tracker included), and the same command run again resumes. The
commands: encode, train (both with --workers 2), sample and evaluate (--workers 2).

Each command runs in its own session, so that its process group is its tree; it is stopped at a point it
reaches by writing a file (its first finished shard, checkpoint or batch), whatever the machine's speed."""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from image_data import make_image_folder, save_tiny_vae
from processes import torch_path_environment

from fastdit.cli import commands


def start(args, cwd, cache):
    """``fastdit args`` in ``cwd`` (not the checkout: the installed fastdit), in a session of its own, with its
    cache (evaluate's digits network and reference) in ``cache``."""
    environment = torch_path_environment(OMP_NUM_THREADS="1", FASTDIT_CACHE=str(cache))
    return subprocess.Popen([sys.executable, "-m", "fastdit", *args], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def group_members(group) -> list[str]:
    """The processes of process group ``group`` still alive (zombies left aside): "pid command"."""
    members = []
    for status in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(status) as file:
                fields = file.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                with open(status.replace("stat", "cmdline"), "rb") as file:
                    command = file.read().replace(b"\0", b" ").decode(errors="replace")
                members.append(f"{status.split('/')[2]} {command[:120]}")
        except (OSError, IndexError, ValueError):
            continue
    return members


def assert_tree_ends(group, timeout=30):
    deadline = time.time() + timeout
    while (members := group_members(group)) and time.time() < deadline:
        time.sleep(0.1)
    assert not members, f"left behind: {members}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    save_tiny_vae(folder / "vae")
    make_image_folder(folder / "images", per_class=(24, 24))
    # Six feature chunks of 1,024 images for `fastdit evaluate --digits` (about 25 s on a CPU core).
    images = np.random.default_rng(0).integers(0, 256, (6 * 1024, 16, 16, 1), dtype=np.uint8)
    np.savez(folder / "samples.npz", arr_0=images)
    return folder


ENCODE = ["encode", "--data", "{inputs}/images", "--vae", "{inputs}/vae", "--out", "shards", "--image-size", "16",
          "--batch-size", "2", "--shard-size", "4", "--workers", "2"]
TRAIN = ["train", "--data", "{inputs}/shards", "--model", "DiT-S/8", "--global-batch-size", "4", "--steps", "16",
         "--ckpt-every", "2", "--log-every", "2", "--workers", "2", "--skip-data-check", "--out", "run", "--no-progress"]
EVALUATE = ["evaluate", "samples.npz", "--digits", "--batch-size", "16", "--workers", "2", "--out", "report.json"]
SAMPLE = ["sample", "--classes", "1", "2", "--num-per-class", "8", "--batch-size", "1", "--steps", "50", "--out",
          "samples", "--no-progress"]
# Each command, and the file whose appearance means it has finished (and so keeps) some work.
COMMANDS = {"encode": (ENCODE, "shards/shard-00000.json"), "train": (TRAIN, "run/checkpoints/00000002.pt"),
            "sample": (SAMPLE, ".samples.staging-*/batches/0000000.npy.sha256"),
            "evaluate": (EVALUATE, ".samples.npz.features-digits/0000000.npz")}


@pytest.fixture(scope="module")
def shards(inputs):
    """The shard folder that `fastdit train` reads."""
    process = start([part.format(inputs=inputs) for part in ENCODE], inputs, inputs / "cache")
    assert process.wait(timeout=600) == 0, process.communicate()[1]
    return inputs / "shards"


@pytest.fixture(scope="module")
def evaluated(inputs):
    """The report of an evaluation of samples.npz that was not stopped."""
    process = start([part.format(inputs=inputs) for part in EVALUATE], inputs, inputs / "cache")
    assert process.wait(timeout=600) == 0, process.communicate()[1]
    report = json.loads((inputs / "report.json").read_text())
    del report["samples"]  # its path
    return report


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda number: number.name)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_stopped_command_leaves_no_process_and_resumes(command, signum, inputs, shards, evaluated, tmp_path):
    args, marker = COMMANDS[command]
    args = [part.format(inputs=inputs) for part in args]
    if command == "evaluate":
        shutil.copy(inputs / "samples.npz", tmp_path)
    process = start(args, tmp_path, inputs / "cache")
    deadline = time.time() + 600
    while not glob.glob(str(tmp_path / marker)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"it ended before it could be stopped: {process.communicate()[1]}"
    # SIGINT as Ctrl-C sends it: to the whole foreground group, the workers too.
    os.killpg(process.pid, signum) if signum == signal.SIGINT else process.send_signal(signum)
    code = process.wait(timeout=120)
    assert_tree_ends(process.pid)
    stderr = process.stderr.read()
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
        assert code == 128 + signum and lines, stderr
        expected = f"fastdit {command}: stopped by {signum.name}; kept "
        assert lines[-1].startswith(expected) and "to resume, run the same command again: fastdit " in lines[-1]
        assert not any("Traceback" in line for line in lines), stderr
    kept_checkpoint = os.stat(tmp_path / marker).st_mtime_ns if command == "train" else None

    again = start(args, tmp_path, inputs / "cache")
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    assert_tree_ends(again.pid)
    if command == "encode":
        assert int(stdout.split(" kept from before")[0].rsplit(" ", 1)[1]) >= 1, stdout
    elif command == "train":  # resumed from the kept checkpoint, which a restart would have written again
        assert os.stat(tmp_path / marker).st_mtime_ns == kept_checkpoint
        steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")]
        assert steps == list(range(2, 17, 2))
    elif command == "sample":
        assert json.loads((tmp_path / "samples" / "run.json").read_text())["timings"]["resumed_images"] >= 1
    else:  # the work folder is gone once done: the numbers are an uninterrupted evaluation's
        report = json.loads((tmp_path / "report.json").read_text())
        assert report.pop("samples") == str(tmp_path / "samples.npz") and report == evaluated


def test_the_stopped_line_says_what_was_kept_and_how_to_resume(tmp_path):
    out = str(tmp_path / "my run")
    assert commands._stopped_line("train", ["train", "--preset", "digits", "--out", out], argparse.Namespace(out=out),
                                  signal.SIGTERM) == (
        f"fastdit train: stopped by SIGTERM; kept no checkpoint yet in {out}; to resume, run the same command again: "
        f"fastdit train --preset digits --out '{out}'")
    assert commands._stopped_line("bench", ["bench"], None, signal.SIGINT) == "fastdit bench: stopped by SIGINT"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda number: number.name)
def test_a_signal_ends_the_command_with_one_line_and_128_plus_its_number(signum, tmp_path, run_cli, monkeypatch):
    def interrupted_run(args):
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler raises in this thread first
        raise AssertionError("the signal did not stop the command")

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), threading.excepthook
    monkeypatch.setattr(commands.subcommand("train"), "run", interrupted_run)
    code, err = run_cli(["train", "--preset", "digits", "--out", str(tmp_path / "r")])
    assert code == 128 + signum and err == [
        f"fastdit train: stopped by {signum.name}; kept no checkpoint yet in {tmp_path / 'r'}; to resume, run the "
        f"same command again: fastdit train --preset digits --out {tmp_path / 'r'}"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), threading.excepthook) == before

"""Training under faults: a diverging loss, NaN data, damaged checkpoints and logs, a second run into the
same folder, and SIGKILL at random points, during a save and during a log write (issue 16)."""
import json
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch
from test_trainer import RUNNER, kill_when, read_log, run_script, tiny_config, train_in_process, wait_until
from torch.utils._python_dispatch import TorchDispatchMode

from fastdit import distributed
from fastdit.io import FolderInUseError, exclusive_lock, mark_owned_folder
from fastdit.train import run_folder
from fastdit.train.trainer import Trainer, TrainingDiverged

pytestmark = pytest.mark.usefixtures("torch_path")  # runs and their faults, not the kernels: see conftest

ISSUE_COMMAND = ["train", "--preset", "digits", "--lr", "1e6", "--steps", "10", "--log-every", "2", "--no-progress"]


def fastdit(args, cwd):
    return run_script(["-m", "fastdit", *args], cwd)


def checkpoint_steps(out):
    return [int(os.path.basename(path)[:-3]) for path in run_folder.checkpoint_paths(out / "checkpoints")]


def assert_same_weights(out, expected):
    """``out``'s final checkpoint and model/ hold exactly ``expected``'s (a Trainer's) weights."""
    final = torch.load(run_folder.checkpoint_paths(out / "checkpoints")[-1], weights_only=True)
    for name, module in (("model", expected.model), ("ema", expected.ema)):
        for key, value in module.state_dict().items():
            assert torch.equal(final[name][key], value), f"{name}.{key} differs"
    from safetensors.torch import load_file
    for key, value in load_file(out / "model" / "model.safetensors").items():
        assert torch.equal(value, expected.ema.state_dict()[key]), f"model/ {key} differs"


def saved_files(out):
    """The contents of the run's checkpoints and model/, by name."""
    folders = (out / "checkpoints", out / "model")
    return {name: (folder / name).read_bytes() for folder in folders for name in sorted(os.listdir(folder))}


# --- non-finite loss, weights and data ------------------------------------------------------------


def test_the_issues_diverging_command_stops_with_one_line(tmp_path):
    process = fastdit([*ISSUE_COMMAND, "--out", "R"], tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastdit train: error: training diverged: the loss is not finite at step 3 (lr 1e+06)")
    assert not (tmp_path / "R" / "model").exists() and not (tmp_path / "R" / "checkpoints").exists()


class ScalarReads(TorchDispatchMode):
    """Records each tensor read back as a Python number (``.item()``, ``bool()``, ``int()``...): on a GPU each
    is a host sync."""

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.tensors.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("skip_nonfinite, reads", [(None, 0), (2, 1)])
def test_a_training_step_reads_the_device_only_under_skip_nonfinite(tmp_path, skip_nonfinite, reads):
    """The non-finite check costs no host sync per step (one under the opt-in skip policy). Counted on the CPU:
    the reads of values that would live on the GPU; AdamW's step counters stay on the CPU by design and the
    batch's indices are drawn on the CPU, before the step (so the batch is made outside the count)."""
    trainer = Trainer(tiny_config(tmp_path, skip_nonfinite=skip_nonfinite),
                      distributed.Process(0, 1, 0, torch.device("cpu"), None))
    trainer.train_step()
    batch = trainer.global_batch(trainer.step)
    trainer.global_batch = lambda step: batch
    counters = {adam["step"].data_ptr() for adam in trainer.optimizer.state.values()}
    with ScalarReads() as mode:
        trainer.train_step()
    assert len([tensor for tensor in mode.tensors if tensor.data_ptr() not in counters]) == reads


def test_divergence_never_overwrites_the_last_finite_checkpoint(tmp_path):
    train_in_process(tiny_config(tmp_path, steps=4, ckpt_every=4, log_every=4))
    before = saved_files(tmp_path)
    # Resuming asks for the same lr: the run diverges after its checkpoint through weights spoiled by hand.
    process = distributed.Process(0, 1, 0, torch.device("cpu"), None)
    trainer = Trainer(tiny_config(tmp_path, steps=8, ckpt_every=4, log_every=4), process)
    original_step = trainer.train_step

    def spoiled_step():
        terms = original_step()
        if trainer.step == 6:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return terms

    trainer.train_step = spoiled_step
    with pytest.raises(TrainingDiverged, match=r"the loss is not finite at step 7 \(lr 0.001\).*00000004.pt holds "
                                               "the last finite weights"):
        trainer.run(progress=False)
    assert saved_files(tmp_path) == before
    assert [record["step"] for record in read_log(tmp_path)] == [4]


def test_non_finite_weights_are_never_saved(tmp_path):
    """A NaN that the loss does not show (the null class's embedding, say) is still caught before a save."""
    trainer = Trainer(tiny_config(tmp_path), distributed.Process(0, 1, 0, torch.device("cpu"), None))
    trainer.train_step()
    with torch.no_grad():
        trainer.ema.y_embedder.embedding_table.weight[-1, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="ema.y_embedder.embedding_table.weight is not finite at step 1"):
        trainer.save()
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_skip_nonfinite_skips_counts_and_stops_after_n(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, steps=6, log_every=1, ckpt_every=100, skip_nonfinite=1),
                      distributed.Process(0, 1, 0, torch.device("cpu"), None))
    original_batch = trainer.global_batch

    def batch_with_nan(step):  # steps 3 and 5 (1-based) see a NaN noise value
        x, y, t, noise = original_batch(step)
        if step in (2, 4):
            noise = noise.clone()
            noise.view(-1)[0] = float("nan")
        return x, y, t, noise

    monkeypatch.setattr(trainer, "global_batch", batch_with_nan)
    with pytest.raises(TrainingDiverged, match="2 updates with a non-finite loss or gradient by step 5, more than "
                                               "--skip-nonfinite 1"):
        trainer.run(progress=False)
    assert [record["skipped_nonfinite"] for record in read_log(tmp_path)] == [0, 0, 1, 1]
    assert all(parameter.isfinite().all() for parameter in trainer.model.parameters())
    assert {adam["step"].item() for adam in trainer.optimizer.state.values()} == {3}  # steps 1, 2 and 4


def write_shards(directory, bad=None):
    os.makedirs(directory, exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(2):
        latents = generator.standard_normal((6, 4, 4, 4)).astype(np.float32)
        flipped = latents[..., ::-1].copy()
        if bad is not None and bad[0] == index:
            {"latents": latents, "flipped": flipped}[bad[1]][bad[2], 1, 2, 3] = bad[3]
        np.savez(os.path.join(directory, f"shard-{index:05d}.npz"), latents=latents, flipped=flipped,
                 labels=np.arange(6) % 3)


@pytest.mark.parametrize("bad", [(1, "latents", 4, np.nan), (0, "flipped", 0, np.inf), (1, "flipped", 5, -np.inf)])
def test_non_finite_latents_are_named_by_shard_and_index(tmp_path, bad):
    write_shards(tmp_path / "shards", bad)
    config = tiny_config(tmp_path / "run", data=str(tmp_path / "shards"), model_config=None, model="DiT-S/2",
                         image_size=32)
    shard = tmp_path / "shards" / f"shard-{bad[0]:05d}.npz"
    with pytest.raises(ValueError, match=rf"data: {shard}: {bad[1]}\[{bad[2]}\] \(sample {bad[0] * 6 + bad[2]}\) "
                                         "holds a non-finite value"):
        Trainer(config, distributed.Process(0, 1, 0, torch.device("cpu"), None))


def test_finite_latent_shards_load(tmp_path):
    write_shards(tmp_path)
    from fastdit.train.trainer import load_data
    data = load_data(tiny_config(tmp_path / "run", data=str(tmp_path)))
    assert (len(data), data.latent_shape) == (12, (4, 4, 4))


# --- damaged run folders --------------------------------------------------------------------------


def test_a_damaged_checkpoint_is_passed_over_with_a_warning(tmp_path, capfd):
    expected = train_in_process(tiny_config(tmp_path / "straight", steps=6, ckpt_every=2))
    out = tmp_path / "damaged"
    train_in_process(tiny_config(out, steps=6, ckpt_every=2))
    newest = out / "checkpoints" / "00000006.pt"
    saved_size = newest.stat().st_size
    newest.write_bytes(newest.read_bytes()[: saved_size // 2])  # truncated
    middle = out / "checkpoints" / "00000004.pt"
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped: the size holds, the sha256 does not
    middle.write_bytes(bytes(data))
    capfd.readouterr()
    trainer = train_in_process(tiny_config(out, steps=6, ckpt_every=2))
    warnings = capfd.readouterr().err.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert warnings[0] == (f"warning: checkpoint {newest} is damaged: {saved_size // 2} bytes, "
                           f"{saved_size} when saved; trying an older checkpoint")
    assert warnings[1] == (f"warning: checkpoint {middle} is damaged: its sha256 differs from the one recorded "
                           "when it was saved; trying an older checkpoint")
    assert trainer.step == 6
    assert_same_weights(out, expected)
    assert [record["step"] for record in read_log(out)] == list(range(1, 7))


def test_checkpoints_without_a_record_still_load(tmp_path):
    train_in_process(tiny_config(tmp_path, steps=2, ckpt_every=2))
    path = run_folder.checkpoint_paths(tmp_path / "checkpoints")[-1]
    os.remove(run_folder.record_path(path))
    assert run_folder.read_checkpoint(path)["step"] == 2
    with open(path, "r+b") as file:
        file.truncate(100)
    with pytest.raises(run_folder.DamagedCheckpoint, match=f"checkpoint {path} cannot be read"):
        run_folder.read_checkpoint(path)
    with pytest.raises(run_folder.DamagedCheckpoint, match="every checkpoint in .* is damaged \\(00000002.pt\\)"):
        train_in_process(tiny_config(tmp_path, steps=4, ckpt_every=2))


def test_a_torn_last_log_line_is_dropped_and_a_bad_middle_line_named(tmp_path, capfd):
    train_in_process(tiny_config(tmp_path, steps=4, ckpt_every=4))
    log = tmp_path / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines) + lines[-1][:20])  # a kill midway through writing a record
    capfd.readouterr()
    train_in_process(tiny_config(tmp_path, steps=5, ckpt_every=4))
    assert capfd.readouterr().err.strip() == (f"warning: {log} line 5 is torn (the run was stopped while writing "
                                              "it); dropped it")
    assert [record["step"] for record in read_log(tmp_path)] == [1, 2, 3, 4, 5]
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))
    with pytest.raises(ValueError, match=f"{log} line 3 is not a training record"):
        train_in_process(tiny_config(tmp_path, steps=6, ckpt_every=4))


def test_a_kill_during_the_first_save_leaves_no_duplicate_steps_nor_temporaries(tmp_path):
    """The folder as a SIGKILL during the first save leaves it (the issue's case): steps 1-4 logged, the
    checkpoint's temporary half-written, no checkpoint. The resume starts over from step 0."""
    expected = train_in_process(tiny_config(tmp_path / "straight", steps=4, ckpt_every=4))
    out = tmp_path / "killed"
    train_in_process(tiny_config(out, steps=4, ckpt_every=4))
    checkpoint = out / "checkpoints" / "00000004.pt"
    temporary = out / "checkpoints" / ".00000004.pt.k1ll3d.tmp"
    temporary.write_bytes(checkpoint.read_bytes()[:1000])
    checkpoint.unlink()
    os.remove(run_folder.record_path(str(checkpoint)))
    model_temporary = out / "model" / ".model.safetensors.abc_12.tmp"
    model_temporary.write_bytes(b"half")
    train_in_process(tiny_config(out, steps=4, ckpt_every=4))
    assert [record["step"] for record in read_log(out)] == [1, 2, 3, 4]
    assert not temporary.exists() and not model_temporary.exists()
    assert_same_weights(out, expected)


# --- the run folder's lock ------------------------------------------------------------------------


def test_a_locked_run_folder_is_refused_and_left_alone(tmp_path):
    mark_owned_folder(tmp_path, "train")  # as the run holding the lock marked it, right after taking it
    os.makedirs(tmp_path / "checkpoints")
    temporary = tmp_path / "checkpoints" / ".00000002.pt.someone_elses.tmp"
    temporary.write_bytes(b"being written")
    in_use = f"--out {tmp_path} is in use by another fastdit process \\(pid {os.getpid()}\\)"
    with exclusive_lock(tmp_path / ".lock", "held by the test"), pytest.raises(FolderInUseError, match=in_use):
        train_in_process(tiny_config(tmp_path, steps=2))
    assert temporary.exists()
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.slow
def test_a_second_train_into_the_same_out_exits_2_naming_the_first(tmp_path):
    first = fastdit(["train", "--preset", "digits", "--out", "R", "--steps", "100000", "--log-every", "1",
                     "--no-progress"], tmp_path)
    try:
        wait_until((tmp_path / "R" / "log.jsonl").exists, first)
        assert first.poll() is None, first.communicate()[1]
        second = fastdit(["train", "--preset", "digits", "--out", "R", "--steps", "3", "--no-progress"], tmp_path)
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 2
        assert stderr.splitlines() == [(f"fastdit train: error: --out R is in use by another fastdit process (pid "
                                        f"{first.pid}); wait for it to finish or choose another folder")]
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_when_the_folder_is_locked(tmp_path):
    """Rank 0 takes the lock; the other ranks must stop with it, not wait for it in a collective."""
    config = tiny_config(tmp_path / "run", steps=2)
    os.makedirs(config.out)
    with exclusive_lock(os.path.join(config.out, ".lock"), "held by the test"):
        process = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                              "--no-python", sys.executable, "-c", RUNNER, json.dumps(config.__dict__)], tmp_path)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert stderr.count(f"FolderInUseError: --out {config.out} is in use by another fastdit process (pid "
                        f"{os.getpid()})") == 2, stderr
    assert not os.path.exists(os.path.join(config.out, "log.jsonl"))


@pytest.mark.slow
def test_a_killed_run_with_loader_workers_leaves_its_folder_unlocked(tmp_path):
    """The loader's workers must not hold the run folder's lock: SIGKILL the trainer mid-run, and the folder is
    free at once for the rerun that resumes it (a forked worker would keep the lock until it noticed)."""
    write_shards(tmp_path / "shards")
    model = {**tiny_config(tmp_path).model_config, "in_channels": 4, "input_size": 4, "num_classes": 3}
    config = tiny_config(tmp_path / "run", data=str(tmp_path / "shards"), model_config=model, workers=2,
                         steps=100_000, ckpt_every=100_000)
    process = run_script(["-c", RUNNER, json.dumps(config.__dict__)], tmp_path)
    kill_when(process, lambda: last_logged_step(tmp_path / "run") >= 3)
    with exclusive_lock(os.path.join(config.out, ".lock"), "the rerun"):
        pass


# --- SIGKILL at random points, during a save and during a log write -------------------------------

# RUNNER with a fault: argv[2] names what to kill the process in ("save" or "log") and argv[3] which call of it;
# the process writes half of that call's bytes, then SIGKILLs itself. The hooks live here, not in fastdit.
FAULTY_RUNNER = """
import io, os, signal, sys, torch
from fastdit.train import run_folder
kind, call = sys.argv[2], int(sys.argv[3])
calls = [0]

def half_then_kill(data, target):
    calls[0] += 1
    if calls[0] < call:
        return False
    if hasattr(target, "write"):
        target.write(data[: len(data) // 2])
        target.flush()
    else:
        with open(target, "ab") as file:
            file.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

real_save = torch.save
def save(obj, target, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    if half_then_kill(buffer.getvalue(), target) is False:
        target.write(buffer.getvalue()) if hasattr(target, "write") else open(target, "wb").write(buffer.getvalue())

real_append = run_folder.append_log
def append_log(path, record):
    import json
    if half_then_kill((json.dumps(record) + "\\n").encode(), path) is False:
        real_append(path, record)

if kind == "save":
    torch.save = save
else:
    run_folder.append_log = append_log
""" + RUNNER


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path):
    steps = 150
    config = tiny_config(tmp_path / "killed", steps=steps, ckpt_every=7, log_every=3)
    expected = train_in_process(tiny_config(tmp_path / "straight", steps=steps, ckpt_every=7, log_every=3))
    arguments = ["-c", RUNNER, json.dumps(config.__dict__)]
    out = tmp_path / "killed"

    def run_until_killed(args):
        process = run_script(args, tmp_path)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL, stderr

    # Targeted: during the second checkpoint's write, then during the fifth log record's write; each time
    # the next run resumes from what the killed one left.
    run_until_killed(["-c", FAULTY_RUNNER, json.dumps(config.__dict__), "save", "2"])
    assert checkpoint_steps(out) == [7]
    assert any(name.endswith(".tmp") for name in os.listdir(out / "checkpoints"))
    run_until_killed(["-c", FAULTY_RUNNER, json.dumps(config.__dict__), "log", "5"])
    with open(out / "log.jsonl") as log:
        assert not log.read().endswith("\n")  # torn
    # At random points (seeded): once the log reaches a random step, after a random few milliseconds (within
    # a step, a log write or a save). Steps, not seconds, so that a faster or slower machine kills alike.
    chooser = random.Random(16)
    for target in sorted(chooser.sample(range(10, steps - 10, 3), 4)):
        kill_when(run_script(arguments, tmp_path), lambda: last_logged_step(out) >= target,
                  delay=chooser.uniform(0, 0.02))
    finished = run_script(arguments, tmp_path)
    _, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr
    assert_same_weights(out, expected)
    assert [record["step"] for record in read_log(out)] == list(range(3, steps + 1, 3))
    assert not [name for folder in (out, out / "checkpoints", out / "model") for name in os.listdir(folder)
                if name.endswith(".tmp")]


def last_logged_step(out):
    """The last whole record's step in ``out``'s log (0 without one); the log may be mid-write."""
    try:
        with open(out / "log.jsonl") as log:
            lines = [line for line in log if line.endswith("\n")]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0

"""Training: exact resume after SIGKILL, torchrun (gloo) equals one process, clear errors."""
import errno
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
from processes import torch_path_environment

from fastdit import distributed, reference
from fastdit.models.dit import DiT
from fastdit.train import run_folder, shards
from fastdit.train import trainer as train
from fastdit.train.trainer import TrainConfig, Trainer

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
            class_dropout_prob=0.1, learn_sigma=True)

# Runs a TrainConfig given as JSON in argv[1], deterministically; under torchrun when launched so.
RUNNER = """
import json, sys, torch
from fastdit import distributed
from fastdit.train import trainer as train
from fastdit.train.trainer import TrainConfig, Trainer
torch.use_deterministic_algorithms(True)
with distributed.launch("cpu") as process:
    Trainer(TrainConfig(**json.loads(sys.argv[1])), process).run(progress=False)
"""


def tiny_config(out, **overrides):
    values = dict(out=str(out), model=None, model_config=TINY, data="digits", image_size=8, global_batch_size=8,
                  lr=1e-3, steps=6, ema_decay=0.9, flip=False, precision="fp32", ckpt_every=2, log_every=1, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def train_in_process(config):
    torch.use_deterministic_algorithms(True)
    try:
        with distributed.launch("cpu") as process:
            trainer = Trainer(config, process)
            trainer.run(progress=False)
            return trainer
    finally:
        torch.use_deterministic_algorithms(False)


def run_script(args, cwd):
    """``python args`` from ``cwd`` (not the checkout, whose fastdit/ source tree would shadow the
    installed package), one thread, on the fused ops' torch path: these are tests of processes, files and
    signals (the kernels are checked in tests/kernels and tests/models), and interpreted, a digits run takes
    minutes."""
    env = torch_path_environment(OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(ready, process, timeout=120):
    """Poll until ``ready()`` holds, ``process`` has ended or ``timeout`` seconds have passed."""
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)  # short: the kill tests aim within a step


def kill_when(process, ready, delay=0.0):
    """SIGKILL ``process`` ``delay`` seconds after ``ready()`` first holds; it must not have ended before."""
    wait_until(ready, process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    # wait, not communicate: a killed trainer's loader workers can hold its pipes open for a while.
    if process.wait(timeout=60) != -signal.SIGKILL:
        raise AssertionError(f"the run ended before it could be killed: {process.communicate()[1]}")


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as log:
        return [json.loads(line) for line in log]


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    steps, every = 60, 10
    expected = train_in_process(tiny_config(tmp_path / "straight", steps=steps, ckpt_every=every))
    config = tiny_config(tmp_path / "killed", steps=steps, ckpt_every=every)
    arguments = ["-c", RUNNER, json.dumps(config.__dict__)]
    first = tmp_path / "killed" / "checkpoints" / f"{every:08d}.pt"
    kill_when(run_script(arguments, tmp_path), first.exists)
    resumed = run_script(arguments, tmp_path)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    final = torch.load(tmp_path / "killed" / "checkpoints" / f"{steps:08d}.pt", weights_only=True)
    for name, module in (("model", expected.model), ("ema", expected.ema)):
        for key, value in module.state_dict().items():
            assert torch.equal(final[name][key], value), f"{name}.{key} differs after resume"
    assert [record["step"] for record in read_log(tmp_path / "killed")] == list(range(1, steps + 1))


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    single = train_in_process(tiny_config(tmp_path / "one", steps=3))
    config = tiny_config(tmp_path / "two", steps=3)
    process = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          "--no-python", sys.executable, "-c", RUNNER, json.dumps(config.__dict__)], tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    two = torch.load(tmp_path / "two" / "checkpoints" / f"{3:08d}.pt", weights_only=True)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses_one = [record["loss"] for record in read_log(tmp_path / "one")]
    losses_two = [record["loss"] for record in read_log(tmp_path / "two")]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)


def test_batch_not_divisible_by_world_size(tmp_path):
    process = distributed.Process(0, 3, 0, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="global batch size 8 is not divisible by the number of processes \\(3\\)"):
        Trainer(tiny_config(tmp_path), process)


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused(tmp_path):
    train_in_process(tiny_config(tmp_path, steps=2))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(ValueError, match="lr=0.001.*lr=0.002"):
        train_in_process(tiny_config(tmp_path, steps=4, lr=2e-3))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_missing_data_and_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="'.*nowhere' is not a directory of latent shards"):
        train_in_process(tiny_config(tmp_path, data=str(tmp_path / "nowhere")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no latent shards .* in '.*empty'"):
        train_in_process(tiny_config(tmp_path / "run", data=str(tmp_path / "empty")))
    with pytest.raises(KeyError, match="unknown model 'DiT-Q/2'"):
        train_in_process(tiny_config(tmp_path, model="DiT-Q/2", model_config=None))


@pytest.mark.slow
def test_loss_goes_down_and_model_is_written(tmp_path):
    trainer = train_in_process(tiny_config(tmp_path, steps=60, ckpt_every=60, log_every=10, lr=3e-3))
    losses = [record["mse"] for record in read_log(tmp_path)]
    assert losses[-1] < losses[0]
    assert os.path.exists(tmp_path / "model" / "model.safetensors")
    assert trainer.step == 60


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*to a meta parameter.*is a no-op")  # the stand-in device holds no values
def test_resume_onto_an_accelerator_keeps_rng_states_and_adam_steps_on_the_cpu(tmp_path, monkeypatch):
    """Resume a CPU run's checkpoint into a trainer on another device (the meta device stands in for a GPU):
    the RNG states must reach torch as CPU ByteTensors (a GPU copy is a TypeError there), and AdamW's
    ``step`` counters must stay CPU scalars (on the GPU each would cost a host sync per parameter per step)."""
    saved_cuda_states = [torch.get_rng_state(), torch.get_rng_state()]  # stand-ins for two GPUs' states
    monkeypatch.setattr(train, "_rng_state", lambda: {"torch": torch.get_rng_state(), "cuda": saved_cuda_states})
    train_in_process(tiny_config(tmp_path, steps=2))
    handed = {}
    monkeypatch.setattr(torch, "set_rng_state", lambda state: handed.setdefault("torch", state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: handed.setdefault("cuda", states))
    trainer = Trainer(tiny_config(tmp_path, steps=2), distributed.Process(0, 1, 0, torch.device("meta"), None))
    trainer.resume(trainer.latest_checkpoint())
    assert trainer.step == 2
    for state in (handed["torch"], *handed["cuda"]):
        assert state.device.type == "cpu" and state.dtype == torch.uint8
    assert len(handed["cuda"]) == len(saved_cuda_states)
    assert len(trainer.optimizer.state) > 0
    for adam in trainer.optimizer.state.values():
        assert adam["step"].device.type == "cpu" and adam["step"].item() == 2
        assert adam["exp_avg"].device.type == "meta" and adam["exp_avg_sq"].device.type == "meta"
    assert all(parameter.device.type == "meta" for parameter in trainer.ema.parameters())


def in_the_release_layout(optimizer_state):
    """The tiny model's optimizer state as the release's parameter list holds it (fastdit's before the adaLN
    weights were stacked): each layer's adaLN weight and bias a parameter of its own, the blocks' rows first."""
    names = [name for name, _ in DiT(**TINY).named_parameters()]
    by_name = {name: optimizer_state["state"].get(index) for index, name in enumerate(names)}
    taken, state = {"weight": 0, "bias": 0}, {}
    release = list(reference.DiT(**TINY).named_parameters())
    for index, (name, parameter) in enumerate(release):
        if "adaLN_modulation" in name:
            part = name.rpartition(".")[2]
            rows = slice(taken[part], taken[part] + parameter.shape[0])
            taken[part] = rows.stop
            state[index] = {key: value[rows].clone() if value.dim() else value.clone()
                            for key, value in by_name[f"modulation_{part}"].items()}
        elif by_name[name] is not None:
            state[index] = by_name[name]
    (group,) = optimizer_state["param_groups"]
    return {"state": state, "param_groups": [{**group, "params": list(range(len(release)))}]}


def test_a_checkpoint_with_an_adam_state_per_adaln_layer_resumes_exactly(tmp_path):
    """A run folder whose optimizer state lists each adaLN layer's weight and bias resumes as if it held the
    stacked parameters' state; what the resumed run writes loads strictly into the release's model."""
    train_in_process(tiny_config(tmp_path / "per-layer", steps=2))
    path = str(tmp_path / "per-layer" / "checkpoints" / "00000002.pt")
    state = run_folder.read_checkpoint(path)
    state["optimizer"] = in_the_release_layout(state["optimizer"])
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(list(DiT(**TINY).parameters())) + 2
    run_folder.write_checkpoint(state, path)
    resumed = train_in_process(tiny_config(tmp_path / "per-layer", steps=4))
    straight = train_in_process(tiny_config(tmp_path / "straight", steps=4))
    for name in ("model", "ema"):
        expected = getattr(straight, name).state_dict()
        for key, value in getattr(resumed, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key} differs after resume"
    expected = straight.optimizer.state_dict()["state"]
    for index, adam in resumed.optimizer.state_dict()["state"].items():
        for key, value in adam.items():
            assert torch.equal(value, expected[index][key]), f"optimizer state {index}.{key} differs after resume"
    final = run_folder.read_checkpoint(str(tmp_path / "per-layer" / "checkpoints" / "00000004.pt"))
    for name in ("model", "ema"):
        reference.DiT(**TINY).load_state_dict(final[name], strict=True)


def test_an_optimizer_state_of_another_parameter_list_is_refused_in_one_line(tmp_path):
    train_in_process(tiny_config(tmp_path, steps=2))
    path = str(tmp_path / "checkpoints" / "00000002.pt")
    state = run_folder.read_checkpoint(path)
    del state["optimizer"]["param_groups"][0]["params"][-1]
    trainer = Trainer(tiny_config(tmp_path, steps=2), distributed.Process(0, 1, 0, torch.device("cpu"), None))
    count = len(list(trainer.model.parameters()))
    with pytest.raises(ValueError, match=rf"^resume: {re.escape(path)}: the optimizer state holds {count - 1} parameters, the "
                                         rf"model has {count} \({count + 2} with each adaLN layer's weight and bias "
                                         r"its own\); use another --out to start a new run$"):
        trainer.resume(path, state)


def test_defaults_are_the_papers_recipe():
    """The README's training recipe: AdamW 1e-4, batch 256, EMA 0.9999, class dropout 0.1 (and section 4's
    400K steps); the digits preset trains 2,500 steps, as the README's ablation says."""
    config = TrainConfig(out="unused")
    assert (config.lr, config.global_batch_size, config.ema_decay, config.class_dropout_prob, config.steps) == (
        1e-4, 256, 0.9999, 0.1, 400_000)
    assert train.PRESETS["digits"]["steps"] == 2500


def test_a_full_disk_while_saving_a_checkpoint_names_it_and_leaves_no_record(tmp_path, monkeypatch):
    """ENOSPC halfway through the step-4 checkpoint: the error names it, and neither it nor its record is
    left (the step-2 checkpoint stays the newest sound one); the rerun with space again finishes the run."""
    failing = os.path.join(tmp_path, "checkpoints", f"{4:08d}.pt")
    temporary_prefix = os.path.join(os.path.dirname(failing), f".{os.path.basename(failing)}.")

    class FullDisk:
        """The checkpoint's file, filling up after 1,000 bytes as a full disk does: write(2) fails."""

        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += memoryview(data).nbytes
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    init = run_folder._HashingWriter.__init__

    def full_disk(self, file):
        init(self, FullDisk(file) if file.name.startswith(temporary_prefix) else file)

    monkeypatch.setattr(run_folder._HashingWriter, "__init__", full_disk)
    with pytest.raises(OSError, match=f"No space left on device: '{failing}'$"):
        train_in_process(tiny_config(tmp_path, steps=4))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [f"{2:08d}.pt", f"{2:08d}.pt.json"]
    monkeypatch.undo()
    train_in_process(tiny_config(tmp_path, steps=4))
    assert run_folder.newest_sound_checkpoint(tmp_path / "checkpoints")[0] == failing


def test_a_shard_whose_checksum_differs_stops_training_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"latents": rng.standard_normal((16, 1, 8, 8), np.float32),
              "flipped": rng.standard_normal((16, 1, 8, 8), np.float32), "labels": rng.integers(0, 10, 16)}
    os.makedirs(tmp_path / "data")
    records = [shards.write_shard(tmp_path / "data", 0, arrays, "fp16", {"latent_dtype": "fp16"})]
    shards.write_manifest(tmp_path / "data", records, 10, {"latent_dtype": "fp16"})
    path = shards.field_path(tmp_path / "data", 0, "flipped")
    with open(path, "r+b") as file:  # a value changed, the size kept: a bad copy
        file.seek(-2, os.SEEK_END)
        file.write(np.float16(3.0).tobytes())
    with pytest.raises(ValueError, match=f"^data: {path}: sha256 [0-9a-f]+ differs from its record's [0-9a-f]+; "
                                         "the file is damaged: re-create them with `fastdit encode`$"):
        train_in_process(tiny_config(tmp_path / "run", data=str(tmp_path / "data"), steps=1, workers=0))
    # --skip-data-check trains on it (the changed value is finite).
    train_in_process(tiny_config(tmp_path / "run", data=str(tmp_path / "data"), steps=1, workers=0, check_data=False))

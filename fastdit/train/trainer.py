"""Training DiT: the paper's recipe, on one process or many (torchrun, DDP), with exact resume.

The recipe (Peebles & Xie, section 4): AdamW, constant lr 1e-4, no weight decay, global batch
256, an EMA of the weights with decay 0.9999, class dropout 0.1 for guidance, random
horizontal flips, the diffusion loss of ``fastdit.diffusion.gaussian`` (eps MSE + the variational
bound for the learned variance).

Everything random in a step (which images, flips, label dropout, t, noise) is drawn for the
whole global batch from a generator seeded by (seed, step), and each rank takes its slice.
So a step does not depend on the number of processes nor on whether the run was resumed:
killing a run and starting the same command again continues bit for bit.

A run folder survives its process being killed at any point: the folder is locked while a run
holds it (a second run into it stops at once), every file is written atomically and each checkpoint
with a record of its size and sha256, so a resume skips a damaged checkpoint for the newest sound one.
A loss that stops being finite stops the run before the weights it spoiled are saved.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastdit import distributed
from fastdit.diffusion.gaussian import create_diffusion
from fastdit.io import check_owned_folder, exclusive_lock, mark_owned_folder, remove_stale_temporaries, write_text_atomic
from fastdit.models import checkpoint as checkpoints
from fastdit.models.dit import DiT, DiT_models
from fastdit.models.modulation import stacked_optimizer_state
from fastdit.models.validation import first_nonfinite
from fastdit.train import data as datasets
from fastdit.train import run_folder, shards
from fastdit.train.shards import RE_ENCODE, LatentShards


@dataclasses.dataclass
class TrainConfig:
    out: str
    model: str | None = "DiT-XL/2"
    model_config: dict | None = None  # constructor arguments; overrides `model`
    block: str = "adaln-zero"  # the paper's block design (fastdit.reference.BLOCK_DESIGNS)
    data: str = "digits"  # "digits", a directory of latent shards, or (pixel) an image folder
    pixel: bool = False
    image_size: int = 256
    global_batch_size: int = 256
    lr: float = 1e-4
    steps: int = 400_000
    ema_decay: float = 0.9999
    class_dropout_prob: float = 0.1
    flip: bool = True
    precision: str = "auto"  # "bf16" (autocast) on GPU, "fp32" elsewhere
    gradient_checkpointing: bool = False
    compile: bool = False
    ckpt_every: int = 5000
    log_every: int = 100
    seed: int = 0
    # DataLoader worker processes reading the batches ahead; None: 4 (at most the CPUs) for latent shards, 0 for
    # data held in memory (the digits, pixel image folders), where a batch is an index into a tensor.
    workers: int | None = None
    # Check the latent shards at start (a full read of the set, shared by the ranks): each file's sha256 against
    # the manifest (a damaged copy), then NaN and infinity, naming the file (and sample). Without it a loss that
    # goes non-finite still names the samples of its batch.
    check_data: bool = True
    # None: the first non-finite loss stops the run. N: skip up to N non-finite updates (the N+1-th stops the
    # run); deciding whether to apply each update costs one host sync per step.
    skip_nonfinite: int | None = None

    # Fields that must match to resume a run; `steps`, logging and checkpoint cadence may change.
    RESUME_KEYS = ("model", "model_config", "block", "data", "pixel", "image_size", "global_batch_size", "lr", "ema_decay",
                   "class_dropout_prob", "flip", "precision", "seed")


PRESETS = {
    # A small class-conditional pixel-space DiT on scikit-learn's digits, upscaled to 16x16
    # (16 tokens of 4x4 patches): the model bundled in fastdit/assets/digits. Small data and a
    # short budget: a larger lr and a faster EMA than the paper's ImageNet recipe, and no flips
    # (a mirrored digit is another glyph). Measured: about 9 steps/s on one CPU thread.
    "digits": dict(
        model=None,
        model_config=dict(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                          num_classes=10, class_dropout_prob=0.1, learn_sigma=True),
        data="digits", image_size=16, global_batch_size=64, lr=1e-3, steps=2500, ema_decay=0.995, flip=False,
        precision="fp32", ckpt_every=250, log_every=25,
    ),
}


def build_model(config: TrainConfig, num_classes: int, in_channels: int, input_size: int) -> DiT:
    if config.model_config is not None:
        arguments = dict(config.model_config)
        fitted = (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size),
                  ("block", config.block))
        for name, value in fitted:
            if arguments.setdefault(name, value) != value:
                raise ValueError(f"model_config: {name}={arguments[name]!r} does not fit the run ({name}={value!r})")
        return DiT(**arguments)
    return DiT_models[config.model](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                    class_dropout_prob=config.class_dropout_prob, block=config.block)


def load_data(config: TrainConfig, rank: int = 0, world_size: int = 1):
    """The run's data: in memory (``TensorData``) or memory-mapped latent shards (``LatentShards``)."""
    if config.data == "digits":
        return datasets.load_digits(config.image_size)
    if config.pixel:
        return datasets.load_image_folder(config.data, config.image_size)
    data = LatentShards(config.data)
    data.check_labels()
    if config.check_data:
        datasets.check_finite(data, rank, world_size)
    return data


class TrainingDiverged(ValueError):
    """The loss, or the weights, stopped being finite; nothing non-finite was saved."""


# The first-non-finite-step flag's value while every loss has been finite.
NO_STEP = 2**62


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":  # gloo has no AVG
            value = value / dist.get_world_size()
    return value


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


class Trainer:
    def __init__(self, config: TrainConfig, process: distributed.Process):
        self.config, self.process = config, process
        self.rank, self.world_size, self.device = process.rank, process.world_size, process.device
        if config.global_batch_size % self.world_size:
            raise ValueError(f"global batch size {config.global_batch_size} is not divisible by the number of "
                             f"processes ({self.world_size})")
        self.local_batch = config.global_batch_size // self.world_size
        self.data = distributed.fail_together(lambda: load_data(config, self.rank, self.world_size), process)
        self.data_identity = datasets.identity(config.data, self.data)
        distributed.fail_together(self._same_data_as_main, process)
        channels, height, _ = self.data.latent_shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the same initial weights on every rank and in every rerun
            self.model = build_model(config, self.data.num_classes, channels, height).to(self.device)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0, foreach=True)
        self.diffusion = create_diffusion("")
        precision = config.precision if config.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast = precision == "bf16"
        self.forward = self.model
        if self.world_size > 1:
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.step = 0
        self.checkpoint_dir = os.path.join(config.out, run_folder.CHECKPOINTS)
        # The first step whose loss was not finite, kept on the device: reading it costs a host sync, so the
        # loop reads it only where it syncs anyway (log points, checkpoints, the final save).
        self.first_nonfinite_step = torch.full((), NO_STEP, dtype=torch.int64, device=self.device)
        self.skipped_nonfinite = 0  # updates skipped under config.skip_nonfinite
        self.saved_step = None  # the newest checkpoint's step, for the error that stops a diverged run
        self._batches, self._next_batch_step = None, None  # the loader's iterator, and the step it yields next

    def _same_data_as_main(self):
        """Machines may each read their own copy of the shards (a local disk): every copy must be rank 0's
        encode, or the ranks would train on different samples of one global batch."""
        if self.world_size == 1 or not isinstance(self.data, LatentShards):
            return
        path = os.path.join(self.data.directory, "manifest.json")
        try:  # nothing may raise before the broadcast, which every rank must reach
            digest = shards.file_sha256(path) if os.path.exists(path) else None  # the old .npz format has none
        except OSError as error:
            digest = f"unreadable ({error})"
        main = distributed.broadcast_from_main(digest, self.process)
        if digest != main:
            raise ValueError(f"data: rank {self.rank}'s {path} differs from rank 0's (sha256 {digest} against {main}): "
                             "the machines hold different encodes; copy rank 0's shard folder to every machine")

    # --- one step ---------------------------------------------------------------------------

    def global_batch(self, step):
        """This rank's slice of the step's global batch: (x, y, t, noise), all on the device."""
        if self._next_batch_step != step:
            self._open_loader(step)
        batch = next(self._batches)
        self._next_batch_step = step + 1
        return [tensor.to(self.device, non_blocking=True) for tensor in batch]

    def _open_loader(self, step):
        """Read the batches from ``step`` on (to the run's last step), ahead of the steps that use them."""
        self.close_loader()
        config = self.config
        batches = datasets.StepBatches(self.data, config.seed, config.global_batch_size, self.rank, self.world_size,
                                       self.diffusion.num_timesteps, self.model.y_embedder.dropout_prob, config.flip)
        workers = config.workers
        if workers is None:
            workers = min(4, len(os.sched_getaffinity(0))) if isinstance(self.data, LatentShards) else 0
        loader = datasets.batch_loader(batches, step, max(step + 1, config.steps), workers,
                                       pin_memory=self.device.type == "cuda")
        self._batches, self._next_batch_step = iter(loader), step

    def close_loader(self):
        """Stop the loader's workers (they also stop when the trainer is collected)."""
        self._batches = self._next_batch_step = None

    def train_step(self):
        x, y, t, noise = self.global_batch(self.step)
        # Label dropout happened above, on the global batch; eval mode keeps the model from
        # dropping labels again (DiT has no other train-time behaviour).
        self.model.eval()
        autocast = torch.autocast(self.device.type, torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with autocast:
            terms = self.diffusion.training_losses(self.forward, x, t, {"y": y}, noise=noise)
        loss = terms["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Averaged over the ranks, the loss is the same on every rank: so is every decision taken on it.
        terms = {name: _mean_over_ranks(value.mean().detach()) for name, value in terms.items()}
        self.step += 1
        finite = torch.isfinite(terms["loss"])
        if self.config.skip_nonfinite is not None and not self._update_is_finite(finite):
            return terms
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - self.config.ema_decay)
        torch.minimum(self.first_nonfinite_step, torch.where(finite, NO_STEP, self.step), out=self.first_nonfinite_step)
        return terms

    def _update_is_finite(self, finite_loss) -> bool:
        """Under ``skip_nonfinite``: whether this step's loss and gradients are finite (one host sync);
        if not, the update is dropped and counted, and one past the allowance stops the run."""
        gradients = [parameter.grad for parameter in self.model.parameters() if parameter.grad is not None]
        if bool(torch.stack([finite_loss, *(gradient.isfinite().all() for gradient in gradients)]).all()):
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_nonfinite += 1
        if self.skipped_nonfinite > self.config.skip_nonfinite:
            raise TrainingDiverged(self._diverged(
                f"{self.skipped_nonfinite} updates with a non-finite loss or gradient by step {self.step}, more "
                f"than --skip-nonfinite {self.config.skip_nonfinite}"))
        return False

    def _bad_data(self, step) -> str:
        """Which samples of step ``step``'s batch (1-based, as logged) hold a NaN or an infinity, if any: the
        culprit of a non-finite loss when the data was not scanned at start."""
        indices = datasets.global_batch_indices(self.config.seed, step - 1, self.config.global_batch_size,
                                                len(self.data))
        found = datasets.nonfinite_samples(self.data, indices)
        if not found:
            return ""
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        return f" (its batch holds non-finite data: {', '.join(found[:3])}{more}; {RE_ENCODE} or remove it)"

    def _diverged(self, what) -> str:
        kept = ("no checkpoint was saved yet" if self.saved_step is None else
                f"{os.path.join(self.checkpoint_dir, f'{self.saved_step:08d}.pt')} holds the last finite weights")
        return (f"training diverged: {what} (lr {self.config.lr:g}); stopped without saving it ({kept}); try a "
                "lower --lr")

    def check_finite(self, weights=False):
        """Raise ``TrainingDiverged`` if a loss so far was not finite, or with ``weights`` if the model,
        EMA or optimizer state holds a NaN or infinity. A host sync: for log points and saves only."""
        first = int(self.first_nonfinite_step)
        if first != NO_STEP:
            raise TrainingDiverged(self._diverged(f"the loss is not finite at step {first}{self._bad_data(first)}"))
        if weights:
            tensors = [*(("model." + name, value) for name, value in self.model.state_dict().items()),
                       *(("ema." + name, value) for name, value in self.ema.state_dict().items()),
                       *((f"optimizer state {name}", value) for adam in self.optimizer.state.values()
                         for name, value in adam.items())]
            bad = first_nonfinite(tensors)
            if bad is not None:
                raise TrainingDiverged(self._diverged(f"{bad} is not finite at step {self.step}"))

    # --- checkpoints ------------------------------------------------------------------------

    def state(self):
        return {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "data_position": self.step * self.config.global_batch_size,
            "skipped_nonfinite": self.skipped_nonfinite,
            "config": dataclasses.asdict(self.config), "model_config": checkpoints.model_config(self.model),
            "data_identity": self.data_identity,
            "rng": self._gathered_rng_states(),
        }

    def _gathered_rng_states(self):
        states = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(states, _rng_state())
        else:
            states[0] = _rng_state()
        return states

    def save(self):
        # Every rank checks (the ranks hold the same weights) and every rank takes part in gathering the RNG
        # states; fail_together keeps a rank that raised from leaving the others waiting in the gather.
        distributed.fail_together(lambda: self.check_finite(weights=True), self.process)
        state = self.state()

        def write():
            if self.rank == 0:
                os.makedirs(self.checkpoint_dir, exist_ok=True)
                run_folder.write_checkpoint(state, os.path.join(self.checkpoint_dir, f"{self.step:08d}.pt"))

        # Also the barrier: a write that fails (a full disk) stops every rank, none waits for rank 0 in vain.
        distributed.fail_together(write, self.process)
        self.saved_step = self.step

    def latest_checkpoint(self):
        paths = run_folder.checkpoint_paths(self.checkpoint_dir)
        return paths[-1] if paths else None

    def resume(self, path, state=None):
        # Loaded to the CPU: load_state_dict copies weights and moments to the parameters' device,
        # while the RNG states must stay CPU ByteTensors (torch.set_rng_state refuses a GPU copy)
        # and AdamW's step counters CPU scalars (on a GPU each costs a host sync per step).
        state = run_folder.read_checkpoint(path) if state is None else state
        # A key missing from an older checkpoint had its field's default.
        saved = {**{field.name: field.default for field in dataclasses.fields(TrainConfig)}, **state["config"]}
        # With a data identity, --data is compared as what it resolves to and holds, not as typed.
        keys = [key for key in TrainConfig.RESUME_KEYS if not (state.get("data_identity") and key == "data")]
        for key in keys:
            if saved[key] != getattr(self.config, key):
                raise ValueError(f"resume: {path} was trained with {key}={saved[key]!r}, this run asks for "
                                 f"{key}={getattr(self.config, key)!r}; use another --out to start a new run")
        run_folder.check_same_inputs(path, state, self.config.data, self.data_identity,
                                     checkpoints.model_config(self.model))
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        try:  # an older run folder's checkpoint holds an Adam state per adaLN layer, the release's parameter list
            self.optimizer.load_state_dict(stacked_optimizer_state(self.model, state["optimizer"]))
        except ValueError as error:
            raise ValueError(f"resume: {path}: {error}; use another --out to start a new run") from None
        self.step = self.saved_step = state["step"]
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        if len(state["rng"]) == self.world_size:  # the steps themselves draw from (seed, step), not from these
            rng = state["rng"][self.rank]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])

    # --- the loop ---------------------------------------------------------------------------

    def _claim_run_folder(self, stack):
        """On rank 0: lock the run folder for the whole run (a second run into it stops here), then clear
        the temporaries that a killed run left (only the lock holder may: another run's are not stale)."""
        if self.rank != 0:
            return
        out = self.config.out
        check_owned_folder(out, "train", ignore=(".lock",), legacy=run_folder.is_legacy_run_folder)
        os.makedirs(out, exist_ok=True)
        stack.enter_context(exclusive_lock(os.path.join(out, ".lock"), f"--out {out}"))
        mark_owned_folder(out, "train")
        for directory in (out, self.checkpoint_dir, os.path.join(out, "model")):  # the folders the run writes
            remove_stale_temporaries(directory)

    def run(self, progress=True):
        with contextlib.ExitStack() as stack:
            stack.callback(self.close_loader)
            distributed.fail_together(lambda: self._claim_run_folder(stack), self.process)
            # Every rank reads the checkpoints rank 0 writes: on several machines --out must be shared.
            distributed.check_shared_folder(self.config.out, self.process, "--out")
            return self._run(progress)

    def _run(self, progress):
        config = self.config
        path, state = distributed.fail_together(
            lambda: run_folder.newest_sound_checkpoint(self.checkpoint_dir, warnings=self.rank == 0), self.process)
        if path is not None:
            self.resume(path, state)
        log_path = os.path.join(config.out, run_folder.LOG_FILE)
        if self.rank == 0:
            # Also with no checkpoint: a run killed before its first save logged steps it will log again.
            run_folder.drop_log_after(log_path, self.step)
            config_path = os.path.join(config.out, run_folder.CONFIG_FILE)
            write_text_atomic(config_path, json.dumps(dataclasses.asdict(config), indent=2))
        bar = tqdm(range(self.step, config.steps), desc="training", initial=self.step, total=config.steps,
                   disable=not (progress and self.rank == 0), dynamic_ncols=True)
        started, started_step = time.perf_counter(), self.step
        self.first_step = started_step  # where this process started: config.steps when the run was finished
        for _ in bar:
            terms = self.train_step()
            if self.step % config.log_every == 0 or self.step == config.steps:
                self.check_finite()
                elapsed = time.perf_counter() - started
                rate = (self.step - started_step) / elapsed if elapsed > 0 else math.nan
                record = {"step": self.step, **{k: float(v) for k, v in terms.items()}, "lr": config.lr,
                          "steps_per_s": rate, "images_per_s": rate * config.global_batch_size}
                if config.skip_nonfinite is not None:
                    record["skipped_nonfinite"] = self.skipped_nonfinite
                if self.rank == 0:
                    run_folder.append_log(log_path, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            if self.step % config.ckpt_every == 0 or self.step == config.steps:
                self.save()
        distributed.fail_together(lambda: self.check_finite(weights=True), self.process)
        distributed.fail_together(
            lambda: self.rank == 0 and checkpoints.save_pretrained(self.ema, os.path.join(config.out, "model")),
            self.process)
        return self.ema

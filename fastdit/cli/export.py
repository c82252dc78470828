"""`fastdit export`: a DiT's guided denoiser as an AOTInductor package, for the C++ runner `fastdit-run`.

The package (``model.pt2``) holds one denoising forward with classifier-free guidance, exactly as
``fastdit.sample`` calls the model (``fastdit.diffusion.denoising.GuidedDenoiser``): inputs x (B, C, H, W) fp32,
t (B,) int64 (the model's timestep), y (B,) int64 (class ids); output the guided eps (B, C, H, W) fp32,
from one forward over [cond; null class]. Shapes are static: B is --batch-size.

What is compiled is the plain-PyTorch reference DiT (``fastdit.reference``, same weights, loaded strictly):
the fast model's fused ops are Python custom ops, which AOTInductor cannot put in a package. On the CPU
Inductor generates C++ for it; on a GPU it generates its own Triton kernels, not fastdit's.

The runner's scalars (shapes, classes, device, guidance) are the package's own metadata (AOTInductor's
``aot_inductor.metadata``, all strings). Beside the package, ``model.timesteps.npy`` (int64, (S,)) and
``model.ddim.npy`` (float64, (S, 2)) are ``fastdit.diffusion.samplers.DDIM``'s schedule at eta 0: the model's timestep
and the row (A, B) of x_prev = A x + B eps at each step, in sampling order. They are the only copy of the
schedule the runner and the tests see.
"""
import json
import os
import time
import warnings

import numpy as np
import torch

import fastdit
from fastdit import reference
from fastdit.cli import options
from fastdit.diffusion.denoising import GuidedDenoiser
from fastdit.diffusion.samplers import make_solver
from fastdit.diffusion.sampling import default_guidance_channels, has_null_class
from fastdit.io import TEMPORARY_SUFFIX, atomic_path, write_npy_atomic
from fastdit.models.config import model_config

FORMAT = "fastdit-export"
FORMAT_VERSION = 2  # native/fastdit_run.cpp's FORMAT_VERSION; 1 wrote the constants as JSON
DEFAULT_STEPS = 50
TEMPORARY_NAME_EXTRA = len(".") + len(".12345678") + len(TEMPORARY_SUFFIX)


def add_arguments(parser):
    parser.description = ("Compile a DiT's guided denoiser with torch.export + AOTInductor into a .pt2 package, "
                          "with the DDIM schedule as .npy files beside it, for the C++ runner fastdit-run. "
                          "Without --model or --ckpt: the bundled digits model with its sampling settings.")
    options.add_model_arguments(parser)
    options.add_sampling_arguments(
        parser, steps_help=f"DDIM steps (default {DEFAULT_STEPS}; the bundled model: its recommended number)",
        seed_help="the random weights of --model are drawn from it", batch_size_help="images per model call "
        "(default 32)")
    options.add_device_arguments(parser)
    parser.add_argument("--out", required=True, help="the package to write, e.g. model.pt2 (model.timesteps.npy "
                        "and model.ddim.npy go beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output files if they exist")


def schedule_paths(package_path) -> tuple[str, str]:
    """model.pt2 -> (model.timesteps.npy, model.ddim.npy): where the runner finds the schedule."""
    stem = os.path.splitext(os.fspath(package_path))[0]
    return stem + ".timesteps.npy", stem + ".ddim.npy"


def ddim_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``fastdit.diffusion.samplers.DDIM``'s model timesteps (int64) and (A, B) rows (float64) at eta 0, in sampling
    order: the sigma column is 0 there, so the runner's step is x_prev = A x + B eps."""
    solver = make_solver("ddim", steps)
    return solver.timesteps.numpy(), solver.coefficients[:, :2].numpy()


class GuidedEps(torch.nn.Module):
    """(x, t, y) -> guided eps: what ``fastdit.sample`` computes for one step, as one exportable forward."""

    def __init__(self, model, cfg_scale):
        super().__init__()
        self.model, self.cfg_scale = model, cfg_scale

    def forward(self, x, t, y):
        model = self.model
        channels = model.in_channels
        denoiser = GuidedDenoiser(model, y, model.num_classes, self.cfg_scale, default_guidance_channels(channels),
                                  channels, model.pos_embed.dtype)
        eps, _ = denoiser(x, t)
        return eps


def check_arguments(args):
    """Every check that needs no model, before anything is loaded or compiled."""
    options.check_model_flags(args)
    options.check_sampling_flags(args)
    if not args.out.endswith(".pt2"):
        raise ValueError(f"--out: expected a package path ending in .pt2 (AOTInductor's format), got {args.out}")
    existing = os.path.dirname(os.path.abspath(args.out))
    while not os.path.lexists(existing):  # lexists: a dangling link is in the way too
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {args.out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: cannot write in {existing}")
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    for path in (args.out, *schedule_paths(args.out)):
        if os.path.isdir(path):
            raise ValueError(f"--out {args.out}: {path} is a directory")
        if os.path.exists(path) and os.path.getsize(path) > 0 and not args.overwrite:
            raise ValueError(f"--out {args.out}: {path} exists (pass --overwrite to replace it)")
        # atomic_path writes ".<name>.<8 random characters>.tmp" beside it first.
        if len(os.fsencode(os.path.basename(path))) + TEMPORARY_NAME_EXTRA > name_max:
            raise ValueError(f"--out {args.out}: the file name {os.path.basename(path)} is too long for this "
                             f"filesystem (at most {name_max - TEMPORARY_NAME_EXTRA} bytes, with the temporary "
                             "file's additions)")


def run(args):
    started = time.perf_counter()
    options.use_bundled_model(args, sampler="ddim")
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.cfg_scale = options.DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    check_arguments(args)
    device = options.resolve_device(args.device)
    dtype = options.resolve_dtype(args.dtype, device)

    fast = options.load_model(args, torch.device("cpu"), dtype)  # moved to the device as the reference DiT
    _, pixels = options.image_size_of(fast, args.image_size)
    with torch.device("meta"):
        model = reference.DiT(**model_config(fast))
    model.load_state_dict(fast.state_dict(), strict=True, assign=True)
    model = model.to(device).eval()
    if args.cfg_scale != 1.0 and not has_null_class(model):
        raise ValueError(f"--cfg-scale {args.cfg_scale} needs the null class, which this model has not (it was built "
                         "with class_dropout_prob=0); use --cfg-scale 1")

    timesteps, coefficients = ddim_schedule(args.steps)
    batch, channels, size = args.batch_size, model.in_channels, model.input_size
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "sampler": "ddim", "eta": 0.0, "steps": len(timesteps),
        "batch_size": batch, "in_channels": channels, "input_size": size, "num_classes": model.num_classes,
        "pixels": "true" if pixels else "false",
        "cfg_scale": args.cfg_scale, "guidance_channels": default_guidance_channels(channels) or channels,
        "null_class": model.num_classes,
        "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "model": json.dumps({**model_config(model), "name": args.model,
                             "checkpoint": os.path.abspath(args.ckpt) if args.ckpt else None}),
        "fastdit_version": fastdit.__version__,
    }
    example = (torch.randn(batch, channels, size, size, device=device),
               torch.full((batch,), 999, dtype=torch.long, device=device),
               torch.arange(batch, device=device) % model.num_classes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    timesteps_path, coefficients_path = schedule_paths(args.out)
    with warnings.catch_warnings(), torch.no_grad():
        # torch's own pytree code warns about its own deprecated LeafSpec check while packaging: not the user's.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.export.export(GuidedEps(model, args.cfg_scale).eval(), example)
        # The schedule is written before the package is renamed into place: a package never lacks its schedule.
        with atomic_path(args.out) as temporary, open(temporary, "w+b") as file:
            torch._inductor.aoti_compile_and_package(program, package_path=file, inductor_configs={
                "aot_inductor.metadata": {key: str(value) for key, value in metadata.items()}})
            file.flush()
            os.fsync(file.fileno())
            write_npy_atomic(timesteps_path, timesteps)
            write_npy_atomic(coefficients_path, coefficients)
    megabytes = os.path.getsize(args.out) / 2**20
    print(f"fastdit export: wrote {args.out} ({megabytes:.1f} MB), {timesteps_path} and {coefficients_path}: ddim "
          f"{args.steps} steps, batch {batch}, cfg {args.cfg_scale}, {metadata['dtype']} on {device}, "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


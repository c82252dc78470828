"""`fastdit export`: a DiT's guided denoiser as an AOTInductor package, for the C++ runner `fastdit-run`.

The package (``model.pt2``) holds one denoising forward with classifier-free guidance, exactly as
``fastdit.sample`` calls the model (``fastdit.diffusion.sampling.GuidedDenoiser``): inputs x (B, C, H, W) fp32,
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
import math
import os
import time
import warnings

import numpy as np
import torch

import fastdit
from fastdit import reference
from fastdit.models import DTYPES
from fastdit.cli.sample import BUNDLED_MODEL, DEFAULT_IMAGE_SIZE, PIXEL_CHANNELS, VAE_DOWNSAMPLING, guidance_channels
from fastdit.diffusion.samplers import make_solver
from fastdit.diffusion.sampling import GuidedDenoiser
from fastdit.io import atomic_path
from fastdit.models.checkpoint import model_config

FORMAT = "fastdit-export"
FORMAT_VERSION = 2  # native/fastdit_run.cpp's FORMAT_VERSION; 1 wrote the constants as JSON
DEFAULT_STEPS = 50
DEFAULT_CFG_SCALE = 4.0


def add_arguments(parser):
    parser.description = ("Compile a DiT's guided denoiser with torch.export + AOTInductor into a .pt2 package, "
                          "with the DDIM schedule as .npy files beside it, for the C++ runner fastdit-run. "
                          "Without --model or --ckpt: the bundled digits model with its sampling settings.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="an architecture with RANDOM weights, one of " + ", ".join(fastdit.DiT_models))
    source.add_argument("--ckpt", help="a trained checkpoint: the release's .pt, a .safetensors file or a "
                        "save_pretrained directory")
    parser.add_argument("--image-size", type=int, help="in pixels; must fit the model (default: the checkpoint's "
                        "size, 256 with --model)")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default {DEFAULT_STEPS}; the bundled model: its "
                        "recommended number)")
    parser.add_argument("--cfg-scale", type=float, help=f"classifier-free guidance scale (1: none; default "
                        f"{DEFAULT_CFG_SCALE}; the bundled model: its recommended one)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", help="default: cuda if there is one, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="the random weights of --model are drawn from it")
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
        denoiser = GuidedDenoiser(model, y, model.num_classes, self.cfg_scale, guidance_channels(model.in_channels),
                                  model.in_channels, model.pos_embed.dtype)
        eps, _ = denoiser(x, t)
        return eps


def use_bundled_model(args):
    """Neither --model nor --ckpt: the bundled digits model, with the DDIM steps and guidance scale it was
    measured with (flags given explicitly win)."""
    if args.model is not None or args.ckpt is not None:
        return
    args.ckpt = BUNDLED_MODEL
    with open(os.path.join(BUNDLED_MODEL, "sampling.json")) as file:
        recommended = json.load(file)
    if args.steps is None and recommended["sampler"] == "ddim":
        args.steps = recommended["steps"]
    if args.cfg_scale is None:
        args.cfg_scale = recommended["cfg_scale"]


def check_arguments(args):
    """Every check that needs no model, before anything is loaded or compiled."""
    if args.model is not None and args.model not in fastdit.DiT_models:
        raise ValueError(f"--model: unknown model {args.model!r}; expected one of {', '.join(fastdit.DiT_models)}")
    if args.model is not None and args.image_size is not None:
        multiple = VAE_DOWNSAMPLING * int(args.model.rsplit("/", 1)[1])
        if args.image_size % multiple:
            raise ValueError(f"--image-size: {args.model} makes images of a multiple of {multiple} px, "
                             f"got {args.image_size}")
    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps: expected an integer in [1, 1000], got {args.steps}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ValueError(f"--cfg-scale: expected a finite number >= 0 (1: no guidance), got {args.cfg_scale}")
    for flag, value, low in (("--seed", args.seed, 0), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag}: expected an integer >= {low}, got {value}")
    if not args.out.endswith(".pt2"):
        raise ValueError(f"--out: expected a package path ending in .pt2 (AOTInductor's format), got {args.out}")
    for path in (args.out, *schedule_paths(args.out)):
        if os.path.isdir(path):
            raise ValueError(f"--out {args.out}: {path} is a directory")
        if os.path.exists(path) and os.path.getsize(path) > 0 and not args.overwrite:
            raise ValueError(f"--out {args.out}: {path} exists (pass --overwrite to replace it)")
    existing = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {args.out}: cannot write in {existing}")


def resolve_device(text):
    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device: expected a torch device such as cpu or cuda:0, got {text!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: this machine has no CUDA device (or torch was built without CUDA)")
    return device


def load_model(args, dtype):
    """The fast model on the CPU, from --ckpt or (--model) with random weights drawn from --seed."""
    if args.ckpt is not None:
        return fastdit.load(args.ckpt, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = fastdit.DiT_models[args.model](input_size=(args.image_size or DEFAULT_IMAGE_SIZE) // VAE_DOWNSAMPLING)
    return model.to(dtype=dtype).eval()


def run(args):
    started = time.perf_counter()
    use_bundled_model(args)
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.cfg_scale = DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    check_arguments(args)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    fast = load_model(args, dtype)
    pixels = fast.in_channels in PIXEL_CHANNELS
    image_size = fast.input_size * (1 if pixels else VAE_DOWNSAMPLING)
    if args.image_size is not None and args.image_size != image_size:
        raise ValueError(f"--image-size: this model makes {image_size} px images, got {args.image_size}")
    with torch.device("meta"):
        model = reference.DiT(**model_config(fast))
    model.load_state_dict(fast.state_dict(), strict=True, assign=True)
    model = model.to(device).eval()
    # The reference DiT's label table has a row for the null class only when it was built for guidance.
    if args.cfg_scale != 1.0 and model.y_embedder.embedding_table.num_embeddings == model.num_classes:
        raise ValueError(f"--cfg-scale {args.cfg_scale} needs the null class, which this model has not (it was built "
                         "with class_dropout_prob=0); use --cfg-scale 1")

    timesteps, coefficients = ddim_schedule(args.steps)
    batch, channels, size = args.batch_size, model.in_channels, model.input_size
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "sampler": "ddim", "eta": 0.0, "steps": len(timesteps),
        "batch_size": batch, "in_channels": channels, "input_size": size, "num_classes": model.num_classes,
        "pixels": "true" if pixels else "false",
        "cfg_scale": args.cfg_scale, "guidance_channels": guidance_channels(channels) or channels,
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
            save_npy_atomic(timesteps_path, timesteps)
            save_npy_atomic(coefficients_path, coefficients)
    megabytes = os.path.getsize(args.out) / 2**20
    print(f"fastdit export: wrote {args.out} ({megabytes:.1f} MB), {timesteps_path} and {coefficients_path}: ddim "
          f"{args.steps} steps, batch {batch}, cfg {args.cfg_scale}, {metadata['dtype']} on {device}, "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


def save_npy_atomic(path, array):
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array)
        file.flush()
        os.fsync(file.fileno())

"""`fastdit export`: a DiT's guided denoiser as an AOTInductor package, for the C++ runner `fastdit-run`.

The package (``model.pt2``) holds one denoising forward with classifier-free guidance, exactly as
``fastdit.sample`` calls the model (``fastdit.sampling.GuidedDenoiser``): inputs x (B, C, H, W) fp32,
t (B,) int64 (the model's timestep), y (B,) int64 (class ids); output the guided eps (B, C, H, W) fp32,
from one forward over [cond; null class]. Shapes are static: B is --batch-size.

What is compiled is the plain-PyTorch reference DiT (``fastdit.reference``, same weights, loaded strictly):
the fast model's fused ops are Python custom ops, which AOTInductor cannot put in a package. On the CPU
Inductor generates C++ for it; on a GPU it generates its own Triton kernels, not fastdit's.

Beside it, ``model.json`` holds what the runner's DDIM loop needs (the steps' model timesteps, abar and
abar_prev in sampling order, eta 0, no x0 clipping: ``fastdit.samplers.DDIM``), the shapes, and how image k's
noise is drawn from --seed (as ``fastdit.sample``: its own generator seeded by (seed, k)).
"""
import json
import os
import time
import warnings

import torch

import fastdit
from fastdit import reference
from fastdit.models.checkpoint import model_config
from fastdit.demo import DTYPES
from fastdit.diffusion import create_diffusion
from fastdit.io import atomic_path, write_text_atomic
from fastdit.sample_cli import (DEFAULT_STEPS, PIXEL_CHANNELS, VAE_DOWNSAMPLING, add_model_arguments, check_flags,
                                check_writable, guidance_channels, load_model, use_bundled_model)
from fastdit.samplers import solver_spacing
from fastdit.sampling import GuidedDenoiser, _has_null_class

FORMAT = "fastdit-export"
FORMAT_VERSION = 1


def add_arguments(parser):
    parser.description = ("Compile a DiT's guided denoiser with torch.export + AOTInductor into a .pt2 package, "
                          "and write the DDIM constants beside it as JSON, for the C++ runner fastdit-run. "
                          "Without --model or --ckpt: the bundled digits model with its sampling settings.")
    add_model_arguments(parser)
    parser.add_argument("--image-size", type=int, help="in pixels; must fit the model (default: the checkpoint's "
                        "size, 256 with --model)")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default {DEFAULT_STEPS['ddim']}; the bundled model: "
                        "its recommended number)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: none; default 4; the "
                        "bundled model: its recommended one)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", help="default: cuda if there is one, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="the random weights of --model are drawn from it")
    parser.add_argument("--out", required=True, help="the package to write, e.g. model.pt2 (the constants go to "
                        "model.json beside it)")
    # use_bundled_model and check_flags also read `fastdit sample`'s class flags: there are none here.
    parser.set_defaults(sampler="ddim", classes=None, num_samples=None, num_per_class=None)


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


def constants_path(package_path) -> str:
    """model.pt2 -> model.json: where the runner finds the sampler's constants."""
    return os.path.splitext(os.fspath(package_path))[0] + ".json"


def ddim_constants(steps: int) -> dict:
    """The DDIM schedule ``fastdit.samplers.DDIM`` samples with (eta 0), in sampling order."""
    diffusion = create_diffusion(solver_spacing("ddim", steps))
    order = torch.arange(diffusion.num_timesteps - 1, -1, -1)
    return {
        "sampler": "ddim",
        "steps": len(order),
        "eta": 0.0,
        "clip_denoised": False,
        "timesteps": diffusion.timestep_map[order].tolist(),
        "alphas_cumprod": diffusion.alphas_cumprod[order].tolist(),
        "alphas_cumprod_prev": diffusion.alphas_cumprod_prev[order].tolist(),
    }


def run(args):
    started = time.perf_counter()
    use_bundled_model(args)
    args.cfg_scale = 4.0 if args.cfg_scale is None else args.cfg_scale
    check_flags(args)
    if not args.out.endswith(".pt2"):
        raise ValueError(f"--out: expected a package path ending in .pt2 (AOTInductor's format), got {args.out}")
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device: expected a torch device such as cpu or cuda:0, got {args.device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device (or torch was built without CUDA)")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    fast = load_model(args, "cpu", dtype)
    pixels = fast.in_channels in PIXEL_CHANNELS
    image_size = fast.input_size * (1 if pixels else VAE_DOWNSAMPLING)
    if args.image_size is not None and args.image_size != image_size:
        raise ValueError(f"--image-size: this model makes {image_size} px images, got {args.image_size}")
    if args.cfg_scale != 1.0 and not _has_null_class(fast):
        raise ValueError(f"--cfg-scale {args.cfg_scale} needs the null class, which this model has not (it was built "
                         "with class_dropout_prob=0); use --cfg-scale 1")
    with torch.device("meta"):
        model = reference.DiT(**model_config(fast))
    model.load_state_dict(fast.state_dict(), strict=True, assign=True)
    model = model.to(device).eval()

    batch, channels, size = args.batch_size, model.in_channels, model.input_size
    example = (torch.randn(batch, channels, size, size, device=device),
               torch.full((batch,), 999, dtype=torch.long, device=device),
               torch.arange(batch, device=device) % model.num_classes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # torch's own pytree code warns about its own deprecated LeafSpec check while packaging: not the user's.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.export.export(GuidedEps(model, args.cfg_scale).eval(), example)
        with atomic_path(args.out) as temporary, open(temporary, "w+b") as file:
            torch._inductor.aoti_compile_and_package(program, package_path=file)
            file.flush()
            os.fsync(file.fileno())
    constants = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package": os.path.basename(args.out),
        "model": {**model_config(model), "checkpoint": os.path.abspath(args.ckpt) if args.ckpt else None,
                  "name": args.model},
        **ddim_constants(args.steps or DEFAULT_STEPS["ddim"]),
        "batch_size": batch,
        "in_channels": channels,
        "input_size": size,
        "num_classes": model.num_classes,
        "pixels": pixels,
        "cfg_scale": args.cfg_scale,
        "guidance_channels": guidance_channels(channels) or channels,
        "null_class": model.num_classes,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "kernels": f"AOTInductor-generated ({'Triton' if device.type == 'cuda' else 'C++'}) from the reference DiT",
        "inputs": {"x": ["float32", [batch, channels, size, size]], "t": ["int64", [batch]], "y": ["int64", [batch]]},
        "output": {"eps": ["float32", [batch, channels, size, size]]},
        "noise": "x_T of image k: torch.randn((C, H, W), generator=torch.Generator().manual_seed("
                 "fastdit.sampling.image_seed(seed, k))), as fastdit.sample",
        "fastdit_version": fastdit.__version__,
        "torch_version": torch.__version__,
    }
    write_text_atomic(constants_path(args.out), json.dumps(constants, indent=2) + "\n")
    megabytes = os.path.getsize(args.out) / 2**20
    print(f"fastdit export: wrote {args.out} ({megabytes:.1f} MB) and {constants_path(args.out)}: ddim "
          f"{constants['steps']} steps, batch {batch}, cfg {args.cfg_scale}, {constants['dtype']} on {device}, "
          f"in {time.perf_counter() - started:.0f} s")
    return 0

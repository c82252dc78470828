"""`fastdit demo`: build a model, check it against the reference, time both."""
import torch

import fastdit
from fastdit import reference
from fastdit.bench.timing import time_median
from fastdit.cli import options
from fastdit.kernels import kernel_path
from fastdit.models.parity import perturb_, relative_max_error


def add_arguments(parser):
    parser.add_argument("--model", default="DiT-S/2", help="an architecture with random weights, one of "
                        + ", ".join(fastdit.DiT_models) + " (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=256, help="image size in pixels (latent = size / 8; "
                        "default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward (default: %(default)s)")
    options.add_device_arguments(parser)
    parser.add_argument("--attn-backend", default="auto", choices=fastdit.ATTENTION_BACKENDS,
                        help="the fast model's attention (auto: the Triton kernel for fp16/bf16 on CUDA, PyTorch SDPA "
                        "otherwise; default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards of each model, the median is "
                        "reported (default: %(default)s)")


def check_arguments(args):
    """Every flag, before a model is built: --model, --image-size (a multiple of the VAE's downsampling and the
    patch), --batch-size, --repeats, then --device (one this machine has)."""
    if args.model not in fastdit.DiT_models:
        raise ValueError(f"--model: unknown model {args.model!r}; expected one of {', '.join(fastdit.DiT_models)}")
    for flag, value in (("--image-size", args.image_size), ("--batch-size", args.batch_size),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, got {value}")
    multiple = options.VAE_DOWNSAMPLING * int(args.model.rsplit("/", 1)[1])  # "DiT-S/2": patch 2
    if args.image_size % multiple:
        raise ValueError(f"--image-size: {args.model} takes images of a multiple of {multiple} px (latents a multiple "
                         f"of its patch size, 1/{options.VAE_DOWNSAMPLING} of the image), got {args.image_size}")
    return options.resolve_device(args.device)


def run(args):
    device = check_arguments(args)
    dtype = options.resolve_dtype(args.dtype, device)
    latent = args.image_size // options.VAE_DOWNSAMPLING
    ref = reference.DiT_models[args.model](input_size=latent).to(device).eval()
    perturb_(ref)  # a fresh adaLN-Zero model outputs zeros: perturb it so the check means something
    fast = fastdit.DiT_models[args.model](input_size=latent, attn_backend=args.attn_backend)
    fast.load_state_dict(ref.state_dict(), strict=True)
    fast = fast.to(device=device, dtype=dtype).eval()

    x = torch.randn(args.batch_size, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    with torch.no_grad():
        expected = ref(x, t, y)
        actual = fast(x.to(dtype), t, y)
        error = relative_max_error(actual, expected)
        ref_time = time_median(lambda: ref(x, t, y), device, args.repeats)
        fast_time = time_median(lambda: fast(x.to(dtype), t, y), device, args.repeats)
    params = sum(p.numel() for p in ref.parameters())
    print(f"{args.model} ({params / 1e6:.1f}M parameters), {args.batch_size} x {latent}x{latent} latents, {device}")
    print(f"kernels: {kernel_path(device)}, attention: {fast.attn_backend}, dtype: {str(dtype).removeprefix('torch.')}")
    print(f"relative max error vs reference (fp32): {error:.2e}")
    print(f"forward: reference fp32 {ref_time * 1e3:.1f} ms, fastdit {fast_time * 1e3:.1f} ms "
          f"({ref_time / fast_time:.2f}x)")
    return 0

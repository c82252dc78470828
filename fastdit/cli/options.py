"""What several `fastdit` subcommands share: the device and dtype flags, the model and checkpoint flags,
the bundled model, and how a flag's model is loaded. The subcommands import this module and the library,
never each other."""
import json
import math
import os

import torch

import fastdit
from fastdit.models import DTYPES
from fastdit.models.checkpoint import WEIGHTS
from fastdit.models.config import MissingNumHeadsError, NonFiniteWeightsError

DEFAULT_IMAGE_SIZE = 256
MAX_IMAGE_SIZE = 4096  # px: 16 times DiT's 256; a larger image is a slip of the keyboard, not a run
MAX_BATCH = 65536  # images in one batch (a global training batch included): 16 times the largest DiT recipe's
MAX_STEPS = 10**9  # training steps (and step intervals): far beyond any run
MAX_WORKERS = 256  # DataLoader processes
VAE_DOWNSAMPLING = 8  # the Stable Diffusion VAE's latents are 1/8 of the image's size
PIXEL_CHANNELS = (1, 3)  # models with these in_channels make grey / RGB pixels in [-1, 1], others VAE latents
DEFAULT_CFG_SCALE = 4.0  # the release's sample.py
# The model `fastdit sample` and `fastdit export` use when given none: a small DiT trained on scikit-learn's
# digits (`fastdit train --preset digits`), with the sampling settings it was measured with (sampling.json).
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits")


SEED_RANGE = (0, 2**32 - 1)  # torch.manual_seed's, with room for the (seed, step) mixing of training


def check_range(flag: str, value, low, high=None, integer=True) -> None:
    """Raise unless ``value`` lies in [``low``, ``high``] (``high`` None: no upper bound), naming the range. Every
    numeric flag is checked so before any work: an out-of-range value never reaches torch."""
    if value is None:
        return
    inside = math.isfinite(value) and value >= low and (high is None or value <= high)
    if not inside:
        kind = "an integer" if integer else "a number"
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{flag}: expected {kind} {allowed}, got {value}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(text) -> torch.device:
    """--device as a torch.device (None: ``default_device()``); a device this machine lacks is an error."""
    if text is None:
        return default_device()
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected a torch device such as cpu or cuda:0, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: this machine has no CUDA device (or torch was built without CUDA)")
    return device


# --device of the commands that run under torchrun: ``distributed.launch`` reads it.
TORCHRUN_DEVICE_HELP = "default: cuda if there is one, else cpu (under torchrun: cuda:LOCAL_RANK)"


def add_device_argument(parser, device_help="default: cuda if there is one, else cpu"):
    """--device: ``resolve_device`` reads it, or ``distributed.launch`` under torchrun (``TORCHRUN_DEVICE_HELP``)."""
    parser.add_argument("--device", help=device_help)


def add_device_arguments(parser, device_help="default: cuda if there is one, else cpu"):
    """--dtype and --device, read by ``resolve_dtype`` and ``resolve_device``."""
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    add_device_argument(parser, device_help)


def resolve_dtype(name, device: torch.device) -> torch.dtype:
    """--dtype, by default bf16 on a GPU and fp32 on the CPU (where bf16 matmuls are slow)."""
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]


def add_model_arguments(parser, random_weights="an architecture with RANDOM weights"):
    """--model or --ckpt (neither: the bundled model) and --image-size, read by ``check_model_flags`` and
    ``load_model``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"{random_weights}, one of " + ", ".join(fastdit.DiT_models))
    source.add_argument("--ckpt", help="a trained checkpoint: the release's .pt, fastdit's training checkpoint "
                        "(OUT/checkpoints/NNNNNNNN.pt), a .safetensors file or a save_pretrained directory")
    parser.add_argument("--weights", choices=WEIGHTS, help="a training checkpoint's EMA or raw model weights "
                        "(default: ema)")
    parser.add_argument("--image-size", type=int, help="in pixels; must fit the model (a latent model makes "
                        f"{VAE_DOWNSAMPLING}x its input size); default: the checkpoint's size, {DEFAULT_IMAGE_SIZE} "
                        "with --model")


def bundled_settings() -> dict | None:
    """The bundled model's recommended sampling settings, None when the package ships without it."""
    path = os.path.join(BUNDLED_MODEL, "sampling.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def use_bundled_model(args, sampler=None) -> dict | None:
    """With neither --model nor --ckpt: the bundled digits model as --ckpt, and the sampling settings it was
    measured with for the flags left unset (flags given explicitly win); returns those settings (None when a model
    was given). ``sampler``: the one sampler of a command without --sampler (export: "ddim"), whose steps are taken
    only when it is the recommended one; None: --sampler and the steps are both taken."""
    if args.model is not None or args.ckpt is not None:
        return None
    recommended = bundled_settings()
    if recommended is None:
        raise ValueError("no model given, and this installation has no bundled model: pass --ckpt PATH (a trained "
                         "checkpoint, e.g. the release's DiT-XL-2-256x256.pt) or --model NAME (random weights, "
                         "e.g. DiT-XL/2)")
    args.ckpt = BUNDLED_MODEL
    names = ("sampler", "steps", "cfg_scale") if sampler is None else (
        ("steps", "cfg_scale") if sampler == recommended["sampler"] else ("cfg_scale",))
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, recommended[name])
    return recommended


def check_model_flags(args):
    """--model's name and --image-size against it, before anything is loaded."""
    if args.weights is not None and args.ckpt is None:
        raise ValueError("--weights: picks a --ckpt training checkpoint's weights; pass --ckpt too")
    if args.model is not None and args.model not in fastdit.DiT_models:
        raise ValueError(f"--model: unknown model {args.model!r}; expected one of {', '.join(fastdit.DiT_models)}")
    check_range("--image-size", args.image_size, 1, MAX_IMAGE_SIZE)
    if args.model is not None and args.image_size is not None:
        patch_size = int(fastdit.DiT_models.canonical(args.model).rsplit("/", 1)[1])  # "DiT-XL-2" is "DiT-XL/2"
        multiple = VAE_DOWNSAMPLING * patch_size
        if args.image_size % multiple:
            raise ValueError(f"--image-size: {args.model} makes images of a multiple of {multiple} px (latents a "
                             f"multiple of its patch size, 1/{VAE_DOWNSAMPLING} of the image), got {args.image_size}")


def add_sampling_arguments(parser, steps_help, seed_help, batch_size_help="images per model call, per process "
                           "(default 32)"):
    """--steps, --cfg-scale (None until ``use_bundled_model`` or the command's default), --seed and --batch-size,
    read by ``check_sampling_flags``."""
    parser.add_argument("--steps", type=int, help=steps_help)
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: none; default "
                        f"{DEFAULT_CFG_SCALE:g}, as the release's sample.py; the bundled model: its recommended one)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help + " (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help=batch_size_help)


def check_sampling_flags(args):
    """--steps and --cfg-scale (None: the model's recommended ones), --seed and --batch-size."""
    check_range("--steps", args.steps, 1, 1000)
    if args.cfg_scale is not None and not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ValueError(f"--cfg-scale: expected a finite number >= 0 (1: no guidance), got {args.cfg_scale}")
    check_range("--seed", args.seed, *SEED_RANGE)
    check_range("--batch-size", args.batch_size, 1, MAX_BATCH)


def load_model(args, device, dtype):
    """The fast model from --ckpt, or --model's architecture with random weights drawn from --seed."""
    if args.ckpt is not None:
        try:
            return fastdit.load(args.ckpt, device=device, dtype=dtype, weights=args.weights)
        except NonFiniteWeightsError as error:  # its advice is the library's keyword: a CLI user needs other words
            other = {"ema": "model", "model": "ema"}[args.weights or "ema"]
            raise ValueError(f"--ckpt {args.ckpt}: the weights are not finite: {error.name} holds {error.count} NaN "
                             "or inf values (first bad tensor; e.g. a diverged training run): pass an earlier "
                             "checkpoint (fastdit train keeps the last finite one in OUT/checkpoints), or for a "
                             f"training checkpoint try --weights {other}") from None
        except MissingNumHeadsError as error:  # the library's advice is a keyword argument: a CLI user needs a command
            raise ValueError(f"--ckpt {args.ckpt}: stores no config, and its width {error.hidden_size} is not one of "
                             "the paper's, whose heads are known: write one that stores it with fastdit convert "
                             f"{args.ckpt} DST --to fastdit --num-heads N, and pass --ckpt DST") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # every rank, and every command, builds the same random weights
        model = fastdit.DiT_models[args.model](input_size=(args.image_size or DEFAULT_IMAGE_SIZE) // VAE_DOWNSAMPLING)
    return model.to(device=device, dtype=dtype).eval()


def image_size_of(model, requested) -> tuple[int, bool]:
    """(the model's image size in pixels, whether it makes pixels); --image-size must equal it."""
    pixels = model.in_channels in PIXEL_CHANNELS
    image_size = model.input_size * (1 if pixels else VAE_DOWNSAMPLING)
    if requested is not None and requested != image_size:
        raise ValueError(f"--image-size: this model makes {image_size} px images, got {requested} (it samples "
                         f"{model.input_size}x{model.input_size} {'pixels' if pixels else 'latents'})")
    return image_size, pixels

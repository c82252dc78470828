"""`fastdit sample`: class-conditional images from a DiT, in one process or many (torchrun).

Every input is checked before the first step (flags, the run's size, checkpoint, VAE, class ids, --out).
A run's --out holds exactly that run's files, and a run that fails or is killed at any point leaves the
previous output whole. So --out is written as a whole:

- the run takes an exclusive lock, the hidden file ``.<name>.lock`` beside --out (beside it, not in it:
  it must outlive the swap below); a second run into the same --out stops at once, naming the holder's pid;
- it removes what a killed run left (``.<name>.staging-*`` folders; see below), then creates its own
  empty staging folder beside --out, before any work, so every path it will write is known to work;
- it writes everything there, run.json last, and swaps the folder in for --out with one atomic
  ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15; a plain rename when --out does not exist yet); the
  previous output, now in the staging folder, is then removed. Where the exchange is not supported
  (another OS, a filesystem without it) the swap is two renames, the old --out moved aside to
  ``.<name>.previous-*`` first: a kill between the two leaves --out missing, and the next run puts
  the previous output back before it starts;
- an existing --out is replaced only when it holds nothing but a sample run's files (run.json,
  samples.npz, grid.png, images/*.png): any other folder is refused, never deleted.

Under torchrun the run's batches are split over the ranks, whole: a batch's
images, labels and noise are those of the same batch in a single-process run with the same --batch-size,
so the result is the same; rank 0 gathers the images and writes them.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import PIL
import torch
from tqdm.auto import tqdm

import fastdit
from fastdit.cli import options
from fastdit.cli.options import BUNDLED_MODEL
from fastdit.diffusion.samplers import SAMPLERS
from fastdit.diffusion.sampling import default_guidance_channels, sample
from fastdit.io import atomic_path, exclusive_lock, write_bytes_atomic, write_text_atomic
from fastdit.kernels import kernel_path
from fastdit.models.validation import check_class_ids
from fastdit.train import distributed, images

DEFAULT_STEPS = {"ddpm": 250, "ddim": 25, "dpm++": 20}
DEFAULT_NUM_SAMPLES = 8
# Samples are held in memory until they are written: a run's size is capped well above the 50,000 images of
# an FID evaluation, so that a slip of the keyboard fails at once rather than after allocating terabytes.
MAX_NUM_SAMPLES = 1_000_000
SAMPLE_OUTPUTS = ("grid.png", "images", "run.json", "samples.npz")  # what a run writes in --out
GRID_MAX_IMAGES = 100  # grid.png is a preview: a 50k-image FID run keeps the first 100
GRID_MAX_COLUMNS = 16


def add_arguments(parser):
    parser.description = ("Sample class-conditional images from a DiT. On many GPUs: torchrun --nproc_per_node K -m "
                          "fastdit sample ..., which gives the same images as one process for the same --seed and "
                          "--batch-size.")
    options.add_model_arguments(parser, "an architecture with RANDOM weights (noise-like images)")
    parser.add_argument("--vae", help="a local diffusers AutoencoderKL directory, to decode a latent model's samples "
                        "to images (needs diffusers: pip install 'fastdit[vae]'); without it a latent model's samples.npz holds "
                        "the latents")
    parser.add_argument("--classes", type=int, nargs="+", metavar="ID", help="class ids to sample "
                        "(default: random classes drawn from --seed)")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--num-per-class", type=int, help="images per class of --classes (default 1)")
    count.add_argument("--num-samples", type=int, help=f"images of random classes (default {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: ddpm (the bundled model: its recommended one)")
    parser.add_argument("--steps", type=int, help="denoising steps; default: "
                        + ", ".join(f"{steps} for {name}" for name, steps in DEFAULT_STEPS.items()))
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: none; default 4, as the "
                        "release's sample.py; the bundled model: its recommended one)")
    parser.add_argument("--seed", type=int, default=0, help="image k's noise depends only on (seed, k)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call, per process (default 32)")
    options.add_device_arguments(parser, "default: cuda if there is one, else cpu (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="run the model through torch.compile")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each denoising step as a CUDA graph (default: on CUDA)")
    parser.add_argument("--out", default="samples", help="output directory (default: ./samples)")
    parser.add_argument("--save-images", action="store_true", help="also write one PNG per image to OUT/images/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclasses.dataclass
class Plan:
    """What a checked run samples: the model, the VAE (or None), one label per image, and what comes out."""

    model: torch.nn.Module
    vae: object
    labels: np.ndarray
    image_size: int
    pixels: bool  # the model samples pixels; else latents, decoded when there is a VAE
    load_seconds: float
    staging: str | None  # where the main process writes the outputs before they replace --out

    @property
    def writes_images(self):
        return self.pixels or self.vae is not None


def run(args):
    started = time.perf_counter()
    use_bundled_model(args)
    args.sampler = args.sampler or "ddpm"
    args.cfg_scale = 4.0 if args.cfg_scale is None else args.cfg_scale
    check_flags(args)
    with distributed.launch(args.device) as process, contextlib.ExitStack() as held:
        plan = distributed.fail_together(lambda: prepare(args, process, held), process)
        sampling_started = time.perf_counter()
        # Every rank stops if one's samples are not finite, rather than wait for it in the gather.
        share = distributed.fail_together(lambda: sample_share(plan, args, process), process)
        samples = distributed.gather_to_main(share, process)
        sampling_seconds = time.perf_counter() - sampling_started
        if process.is_main:
            write_outputs(args, plan, process, samples, started, sampling_seconds)
            swap_in(plan.staging, output_path(args.out))
    return 0


def use_bundled_model(args):
    """With neither --model nor --ckpt: the bundled digits model, ten images of each class, and the
    sampler, steps and guidance it was measured with (flags given explicitly win)."""
    recommended = options.bundled_settings()
    if args.model is not None or args.ckpt is not None or recommended is None:
        return
    args.ckpt = BUNDLED_MODEL
    if args.classes is None and args.num_samples is None:
        args.classes = list(range(recommended["num_classes"]))
        args.num_per_class = args.num_per_class or recommended["num_per_class"]
    for name in ("sampler", "steps", "cfg_scale"):
        if getattr(args, name) is None:
            setattr(args, name, recommended[name])


def check_flags(args):
    """The checks that need no model: everything here fails the same way on every rank."""
    if args.model is None and args.ckpt is None:
        raise ValueError("no model given: pass --ckpt PATH (a trained checkpoint, e.g. the release's "
                         "DiT-XL-2-256x256.pt) or --model NAME (random weights, e.g. DiT-XL/2)")
    options.check_model_flags(args)
    options.check_sampling_flags(args)
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--num-per-class", args.num_per_class, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag}: expected an integer >= {low}, got {value}")
    if args.num_per_class is not None and args.classes is None:
        raise ValueError("--num-per-class: needs --classes (without --classes use --num-samples)")
    if args.num_samples is not None and args.classes is not None:
        raise ValueError("--num-samples: draws random classes; with --classes use --num-per-class")
    if args.classes is not None and len(args.classes) * (args.num_per_class or 1) > MAX_NUM_SAMPLES:
        raise ValueError(f"--num-per-class: {len(args.classes)} classes x {args.num_per_class} = "
                         f"{len(args.classes) * args.num_per_class} images; a run makes at most {MAX_NUM_SAMPLES} "
                         "(they are held in memory): split it into runs with different --seed")
    if args.num_samples is not None and args.num_samples > MAX_NUM_SAMPLES:
        raise ValueError(f"--num-samples: a run makes at most {MAX_NUM_SAMPLES} images (they are held in memory), "
                         f"got {args.num_samples}: split it into runs with different --seed")


def output_path(out) -> str:
    """--out as an absolute path with symbolic links resolved (the swap replaces the folder, not a link)."""
    if not out or not out.strip():
        raise ValueError(f"--out: expected a folder path, got {out!r}")
    path = os.path.realpath(out)
    if os.path.dirname(path) == path:
        raise ValueError(f"--out {out}: a run replaces its --out as a whole; the filesystem root cannot be replaced")
    return path


def check_output(out) -> str:
    """Raise unless ``out`` can be this run's output folder: a new folder, or one holding only an earlier
    sample run's files, whose parent this process can write in. Returns its path; creates nothing."""
    path = output_path(out)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise OSError(f"--out {out}: {path} is a file, not a directory")
        foreign = [name for name in sorted(os.listdir(path)) if name not in SAMPLE_OUTPUTS]
        images_dir = os.path.join(path, "images")
        if os.path.isdir(images_dir):
            foreign += [f"images/{name}" for name in sorted(os.listdir(images_dir)) if not name.endswith(".png")]
        if foreign:
            raise ValueError(f"--out {out}: holds files a sample run does not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}), and a run replaces its --out as a whole: "
                             "choose a new or empty folder")
    existing = os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OSError(f"--out {out}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OSError(f"--out {out}: cannot write in {existing} ({error.strerror or error})") from None
    return path


@contextlib.contextmanager
def claimed_output(out):
    """Hold --out's lock for the run and yield an empty staging folder beside --out, removed on the way out
    unless ``swap_in`` has taken it; a killed run's leftovers are cleared first."""
    path = check_output(out)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    with exclusive_lock(os.path.join(parent, f".{name}.lock"), f"--out {out}"):
        recover_interrupted(path)
        staging = None
        try:  # a signal between mkdtemp and the assignment leaves an empty folder, which the next run removes
            staging = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent)
            yield staging
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)


def recover_interrupted(path):
    """Under --out's lock: remove the staging folders of killed runs (a whole new output that was never
    swapped in, a partial one, or the previous output after the swap), and put back an output that a killed
    two-rename swap had moved aside."""
    parent, name = os.path.split(path)
    leftover = re.compile(rf"^\.{re.escape(name)}\.(staging|previous)-[a-z0-9_]+$")
    for entry in sorted(os.scandir(parent), key=lambda entry: entry.name):
        match = leftover.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        if match.group(1) == "previous" and not os.path.exists(path):
            os.rename(entry.path, path)
        else:
            shutil.rmtree(entry.path)


def exchange(first, second) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem
    cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2  # from <fcntl.h> and <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)


def swap_in(staging, path):
    """Make the complete staging folder --out in one atomic step, then remove the previous output."""
    parent = os.path.dirname(path)
    _fsync_directory(staging)
    if not os.path.exists(path):
        os.rename(staging, path)
    elif exchange(staging, path):
        shutil.rmtree(staging)  # now the previous output
    else:
        previous = os.path.join(parent, os.path.basename(staging).replace(".staging-", ".previous-", 1))
        os.rename(path, previous)
        os.rename(staging, path)
        shutil.rmtree(previous)
    _fsync_directory(parent)  # the renames survive a power cut


def _fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def class_labels(args, num_classes):
    """One class id per image, int64: each of --classes --num-per-class times, or random ones from --seed."""
    if args.classes is None:
        return np.random.default_rng(args.seed).integers(0, num_classes, args.num_samples or DEFAULT_NUM_SAMPLES)
    check_class_ids(torch.tensor(args.classes), num_classes, "--classes")
    return np.repeat(np.array(args.classes, np.int64), args.num_per_class or 1)


def warn(process, message):
    if process.is_main:
        print(f"fastdit sample: warning: {message}", file=sys.stderr)


def prepare(args, process, held):
    """Check the run against the model and the machine, and load what it samples with; the main process
    first claims --out (``held`` keeps the claim until the run ends)."""
    started = time.perf_counter()
    staging = held.enter_context(claimed_output(args.out)) if process.is_main else None
    dtype = options.resolve_dtype(args.dtype, process.device)
    model = options.load_model(args, process.device, dtype)
    image_size, pixels = options.image_size_of(model, args.image_size)
    if args.vae is not None and pixels:
        raise ValueError(f"--vae: this model samples pixels (in_channels={model.in_channels}), it needs no VAE")
    labels = class_labels(args, model.num_classes)
    vae = None
    if args.vae is not None:
        from fastdit.train.vae import VAE

        vae = VAE.load(args.vae, process.device, dtype)
        if (vae.latent_channels, vae.downsampling) != (model.in_channels, options.VAE_DOWNSAMPLING):
            raise ValueError(f"--vae: its latents have {vae.latent_channels} channels at 1/{vae.downsampling} of the "
                             f"image size; the model's have {model.in_channels} at 1/{options.VAE_DOWNSAMPLING}")
    if args.model is not None:
        warn(process, f"--model {args.model} has random weights: the images will look like noise "
                      "(pass --ckpt PATH for a trained model)")
    if not pixels and vae is None:
        warn(process, f"no --vae for this latent model (in_channels={model.in_channels}): samples.npz will hold the "
                      "latents ('latents', N x C x H x W float32) and no images are written")
    return Plan(model, vae, labels, image_size, pixels, time.perf_counter() - started, staging)


def decoded(plan, latents):
    """A batch's samples as they are saved: uint8 NHWC images, or the latents when there is no VAE."""
    if plan.vae is not None:
        return plan.vae.decode(latents).cpu().numpy()
    if plan.pixels:
        return images.to_uint8(latents)
    return latents.cpu().numpy()


def sample_share(plan, args, process):
    """This rank's share of the run's batches, sampled and decoded, concatenated in order."""
    total = len(plan.labels)
    batches = [range(start, min(start + args.batch_size, total)) for start in range(0, total, args.batch_size)]
    share = distributed.shard(len(batches), process.rank, process.world_size)
    mine = batches[share.start:share.stop]
    show = process.is_main and not args.no_progress
    in_channels = plan.model.in_channels
    pieces = []
    with tqdm(total=sum(map(len, mine)), unit="img", desc="fastdit sample", disable=not show) as bar:
        for batch in mine:
            latents = sample(plan.model, torch.from_numpy(plan.labels[batch.start:batch.stop]),
                             sampler=args.sampler, steps=args.steps or DEFAULT_STEPS[args.sampler],
                             cfg_scale=args.cfg_scale, guidance_channels=default_guidance_channels(in_channels),
                             seed=args.seed, first_index=batch.start, progress=show, compile=args.compile,
                             cuda_graphs="auto" if args.cuda_graphs is None else args.cuda_graphs)
            pieces.append(decoded(plan, latents))
            bar.update(len(batch))
    return np.concatenate(pieces) if pieces else np.empty(0)


def grid_columns(args):
    per_class = args.num_per_class or 1
    return per_class if args.classes is not None and 1 < per_class <= GRID_MAX_COLUMNS else None


def write_outputs(args, plan, process, samples, started, sampling_seconds):
    """Every output into the staging folder, run.json last."""
    directory, labels = plan.staging, plan.labels
    if plan.writes_images:
        arrays = {"images": samples, "labels": labels, "arr_0": samples}  # arr_0: what the ADM evaluator reads
        if args.save_images:
            os.makedirs(os.path.join(directory, "images"))
            for index, (image, label) in enumerate(zip(samples, labels)):
                path = os.path.join(directory, "images", f"{index:06d}_class{label}.png")
                write_bytes_atomic(path, images.png_bytes(image))
        preview = images.grid(samples[:GRID_MAX_IMAGES], labels[:GRID_MAX_IMAGES], grid_columns(args))
        write_bytes_atomic(os.path.join(directory, "grid.png"), images.png_bytes(preview))
    else:
        arrays = {"latents": samples, "labels": labels}
    with atomic_path(os.path.join(directory, "samples.npz")) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)
        file.flush()
        os.fsync(file.fileno())
    record = run_record(args, plan, process, sorted(arrays), started, sampling_seconds)
    write_text_atomic(os.path.join(directory, "run.json"), json.dumps(record, indent=2) + "\n")


def run_record(args, plan, process, arrays, started, sampling_seconds):
    """run.json: the flags, what they resolved to, the model, the outputs, versions and timings."""
    from fastdit.models.checkpoint import model_config

    model, device, count = plan.model, process.device, len(plan.labels)
    return {
        "command": "fastdit sample",
        "arguments": {key: value for key, value in vars(args).items() if key != "command"},
        "model": {
            "name": args.model,
            "checkpoint": os.path.abspath(args.ckpt) if args.ckpt else None,
            "weights": "random init" if args.ckpt is None else "checkpoint",
            "config": model_config(model),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "samples": "pixels" if plan.pixels else "latents",
        },
        "vae": None if plan.vae is None else {"path": os.path.abspath(args.vae), "scale": plan.vae.scale},
        "sampling": {
            "num_samples": count,
            "image_size": plan.image_size,
            "sampler": args.sampler,
            "steps": args.steps or DEFAULT_STEPS[args.sampler],
            "cfg_scale": args.cfg_scale,
            "guidance_channels": default_guidance_channels(model.in_channels) or model.in_channels,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(device),
            "world_size": process.world_size,
            "kernels": kernel_path(device),
            "attn_backend": model.attn_backend,
            "compile": args.compile,
            "cuda_graphs": device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs,
        },
        "outputs": {
            "samples.npz": arrays,
            "grid.png": min(count, GRID_MAX_IMAGES) if plan.writes_images else None,
            "images": count if plan.writes_images and args.save_images else 0,
        },
        "versions": {
            "fastdit": fastdit.__version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        },
        "timings": {
            "load_seconds": plan.load_seconds,
            "sampling_seconds": sampling_seconds,
            "images_per_second": count / sampling_seconds,
            "total_seconds": time.perf_counter() - started,
        },
    }

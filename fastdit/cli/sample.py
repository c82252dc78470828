"""`fastdit sample`: class-conditional images from a DiT, in one process or many (torchrun), at any
number of images in constant memory, resumable after a kill.

Every input is checked before the first step (flags, the run's size, checkpoint, VAE, class ids, --out).
The run's batches are split over the ranks, whole: a batch's images, labels and noise are those of the
same batch in a single-process run with the same --batch-size, so the result is the same. Each batch goes
to disk as it is sampled and the outputs are assembled from those files by streaming: no process holds
more than a batch of images. How --out is written, and how a killed run resumes:
``fastdit.cli.sample_output``.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import fastdit
from fastdit import distributed, images
from fastdit.cli import options
from fastdit.cli import parallel_flags as parallel_cli
from fastdit.cli.cache_flags import add_cache_arguments, cache_from_args
from fastdit.cli.sample_files import write_outputs, write_pngs
from fastdit.cli.sample_output import Staging, locked_output, recorded, staging_folder, weights_digest
from fastdit.diffusion import settings
from fastdit.diffusion.samplers import DPM_FINAL_STEPS, SAMPLERS, SPACINGS
from fastdit.diffusion.sampling import default_guidance_channels, sample
from fastdit.evaluation.report import check_evaluation, run_evaluation
from fastdit.kernels import kernel_path
from fastdit.models.config import model_config
from fastdit.models.fp8 import QUANTIZATIONS
from fastdit.models.validation import check_class_ids

DEFAULT_NUM_SAMPLES = 8
# A run's size is capped well above the 50,000 images of an FID evaluation (its labels are drawn up front, and
# 1,000,000 images of 256 px make a 197 GB samples.npz), so that a slip of the keyboard fails at once.
MAX_NUM_SAMPLES = 1_000_000


def add_arguments(parser):
    parser.description = ("Sample class-conditional images from a DiT. On many GPUs: torchrun --nproc_per_node K -m "
                          "fastdit sample ..., which gives the same images as one process for the same --seed and "
                          "--batch-size.")
    options.add_model_arguments(parser, "an architecture with RANDOM weights (noise-like images)")
    parser.add_argument("--vae", help="a local diffusers AutoencoderKL directory, to decode a latent model's samples "
                        "to images (needs diffusers: pip install 'fastdit[vae]'); default: the vae/ of a --ckpt "
                        "diffusers pipeline; without one a latent model's samples.npz holds the latents")
    parser.add_argument("--classes", type=int, nargs="+", metavar="ID", help="class ids to sample "
                        "(default: random classes drawn from --seed)")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--num-per-class", type=int, help="images per class of --classes (default 1)")
    count.add_argument("--num-samples", type=int, help=f"images of random classes (default {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the model's recommended one (the bundled "
                        "digits model: ddim; any other: ddpm, as the release's sample.py)")
    options.add_sampling_arguments(
        parser, steps_help="denoising steps; default: the model's recommended number with its own sampler (digits: "
        "50; others: 250), else " + ", ".join(f"{steps} for {name}" for name, steps in settings.DEFAULT_STEPS.items()),
        seed_help="image k's noise depends only on (seed, k)")
    parser.add_argument("--guidance-channels", type=int, metavar="G", help="guide the first G eps channels "
                        "(default: the release's 3 of 4 latent channels, all of a pixel model's; 4: as DiTPipeline)")
    parser.add_argument("--ddim-spacing", choices=SPACINGS, default="release", help="ddim's timesteps: the "
                        "release's (default) or diffusers' DDIMScheduler timestep_spacing (docs/diffusers.md)")
    parser.add_argument("--dpm-final", choices=DPM_FINAL_STEPS, default="release", help="dpm++'s last step: to t = 0 "
                        "(the release's, default) or to sigma 0 (diffusers' final_sigmas_type='zero')")
    options.add_device_arguments(parser, options.TORCHRUN_DEVICE_HELP)
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="fp8: the blocks' GEMMs in FP8 (E4M3 weights, "
                        "per-token scaled inputs; bf16 elsewhere), on the CPU or a GPU of compute capability 8.9+; "
                        "default: none")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="run the model through torch.compile")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each denoising step as a CUDA graph (default: on CUDA)")
    parallel_cli.add_arguments(parser)
    add_cache_arguments(parser)
    parser.add_argument("--out", default="samples", help="output directory (default: ./samples)")
    parser.add_argument("--save-images", action="store_true", help="also write one PNG per image to OUT/images/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--restart", action="store_true", help="discard the finished batches that a killed run left "
                        "for --out (by default the same command resumes them, and another command stops)")
    parser.add_argument("--evaluate", metavar="REF", help="then evaluate the samples against REF as `fastdit evaluate "
                        "OUT REF` does (digits: against scikit-learn's digits, as --digits)")
    parser.add_argument("--inception", metavar="PATH", help="--evaluate's Inception weights (as fastdit evaluate's)")


@dataclasses.dataclass
class Plan:
    """What a checked run samples: the model, the VAE (or None), one label per image, and where it goes."""

    model: torch.nn.Module
    vae: object
    vae_path: str | None
    labels: np.ndarray
    image_size: int
    pixels: bool  # the model samples pixels; else latents, decoded when there is a VAE
    load_seconds: float
    out_path: str | None  # --out, resolved (rank 0's)
    staging: Staging | None  # rank 0's until every rank has it (run)
    resumed: int = 0  # images a killed run of the same command had finished
    split: parallel_cli.Split | None = None  # how this rank shares the work (--parallel), made after prepare

    @property
    def writes_images(self):
        return self.pixels or self.vae is not None

    def batches(self, batch_size) -> list[range]:
        total = len(self.labels)
        return [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def run(args):
    started = time.perf_counter()
    bundled = options.use_bundled_model(args)
    if bundled is not None and args.classes is None and args.num_samples is None:  # ten of each digit
        args.classes = list(range(bundled["num_classes"]))
        args.num_per_class = args.num_per_class or bundled["num_per_class"]
    check_flags(args)
    if args.evaluate:
        check_evaluation(args.evaluate, args.inception)
    with distributed.launch(args.device) as process, contextlib.ExitStack() as held:
        plan = distributed.fail_together(lambda: prepare(args, process, held), process)
        # Outside prepare: the mesh is a collective, which a rank that failed in prepare would never join.
        plan.split = distributed.fail_together(lambda: parallel_cli.setup(args, process, plan.model), process)
        plan.staging = distributed.broadcast_from_main(plan.staging, process)
        distributed.fail_together(lambda: plan.staging.check_visible(process.rank), process)
        batches = plan.batches(args.batch_size)
        # Rank 0 lists the finished batches, so that every rank splits the same list of missing ones.
        finished = distributed.broadcast_from_main(plan.staging.finished_batches() if process.is_main else None,
                                                   process)
        missing = [batch for batch in batches if batch.start not in finished]
        plan.resumed = len(plan.labels) - sum(map(len, missing))
        sampling_started = time.perf_counter()
        # Every rank stops if one's samples are not finite, rather than wait for it at the next collective.
        distributed.fail_together(lambda: sample_batches(plan, args, process, missing), process)
        sampling_seconds = time.perf_counter() - sampling_started
        if plan.writes_images and args.save_images:
            distributed.fail_together(lambda: write_pngs(plan, process, batches), process)
        if process.is_main:
            write_outputs(args, plan, process, batches, started, sampling_seconds,
                          recorded(sampling_settings(args, plan.model)))
            plan.staging.swap_in(plan.out_path)
            print(success_line(args, plan))
        if args.evaluate:  # every rank extracts features; the broadcast also waits for the swap
            run_evaluation(distributed.broadcast_from_main(plan.out_path, process), args.evaluate, process,
                           inception=args.inception)
    return 0


def success_line(args, plan) -> str:
    """What the run wrote, and where (printed with --no-progress too)."""
    written = ["samples.npz", "grid.png"] if plan.writes_images else ["samples.npz (latents)"]
    if plan.writes_images and args.save_images:
        written.append("images/")
    resumed = f" ({plan.resumed} of them by a killed run, resumed)" if plan.resumed else ""
    count = len(plan.labels)
    what = ("image" if plan.writes_images else "sample") + ("s" if count != 1 else "")
    return f"fastdit sample: wrote {count} {what}{resumed} to {plan.out_path}: {', '.join(written)} and run.json"


def check_flags(args):
    """The checks that need no model: everything here fails the same way on every rank."""
    options.check_model_flags(args)
    options.check_sampling_flags(args)
    parallel_cli.check_flags(args)
    args.cache_policy = cache_from_args(args)
    if args.guidance_channels is not None and args.guidance_channels < 1:
        raise ValueError(f"--guidance-channels: expected an integer >= 1, got {args.guidance_channels}")
    if args.sampler is not None:
        check_sampler_flags(args, "--sampler")
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--num-per-class", args.num_per_class, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag}: expected an integer >= {low}, got {value}")
    if args.num_per_class is not None and args.classes is None:
        raise ValueError("--num-per-class: needs --classes (without --classes use --num-samples)")
    if args.num_samples is not None and args.classes is not None:
        raise ValueError("--num-samples: draws random classes; with --classes use --num-per-class")
    if args.classes is not None and len(args.classes) * (args.num_per_class or 1) > MAX_NUM_SAMPLES:
        raise ValueError(f"--num-per-class: {len(args.classes)} classes x {args.num_per_class} = "
                         f"{len(args.classes) * args.num_per_class} images; a run makes at most {MAX_NUM_SAMPLES}: "
                         "split it into runs with different --seed")
    if args.num_samples is not None and args.num_samples > MAX_NUM_SAMPLES:
        raise ValueError(f"--num-samples: a run makes at most {MAX_NUM_SAMPLES} images, got {args.num_samples}: "
                         "split it into runs with different --seed")


def check_sampler_flags(args, source):
    """The flags that apply to one sampler: before loading with --sampler given, else once the model's is known."""
    for flag, value, sampler in (("--ddim-spacing", args.ddim_spacing, "ddim"),
                                 ("--dpm-final", args.dpm_final, "dpm++")):
        if value != "release" and args.sampler != sampler:
            raise ValueError(f"{flag} {value}: applies to --sampler {sampler}, got {source} {args.sampler}")


def use_model_settings(args, model):
    """--sampler, --steps and --cfg-scale: where not given, the model's recommended ones (as fastdit.sample)."""
    source = "--sampler" if args.sampler is not None else "the model's recommended sampler"
    args.sampler, args.steps, args.cfg_scale = settings.resolve(model, args.sampler, args.steps, args.cfg_scale)
    check_sampler_flags(args, source)


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
    """Check the run against the model and the machine, and load what it samples with. The main process
    first locks --out (``held`` keeps it until the run ends), and then, knowing what the run makes, claims
    its staging folder: this command's partial run, or a new one."""
    started = time.perf_counter()
    out_path = held.enter_context(locked_output(args.out)) if process.is_main else None
    if args.quantize is not None and args.dtype not in (None, "bf16"):
        raise ValueError(f"--dtype: --quantize {args.quantize} runs the model in bf16, got --dtype {args.dtype}")
    dtype = options.resolve_dtype("bf16" if args.quantize else args.dtype, process.device)
    model = options.load_model(args, process.device, dtype)
    use_model_settings(args, model)
    if args.quantize is not None:
        model.quantize(args.quantize)
    image_size, pixels = options.image_size_of(model, args.image_size)
    if args.vae is not None and pixels:
        raise ValueError(f"--vae: this model samples pixels (in_channels={model.in_channels}), it needs no VAE")
    if (args.guidance_channels or 0) > model.in_channels:
        raise ValueError(f"--guidance-channels: this model has {model.in_channels} channels, got {args.guidance_channels}")
    labels = class_labels(args, model.num_classes)
    vae_path = args.vae if args.vae is not None or pixels or args.ckpt is None else pipeline_vae(args.ckpt)
    vae = None
    if vae_path is not None:
        from fastdit.models.vae import VAE

        vae = VAE.load(vae_path, process.device, dtype)
        if (vae.latent_channels, vae.downsampling) != (model.in_channels, options.VAE_DOWNSAMPLING):
            raise ValueError(f"--vae: its latents have {vae.latent_channels} channels at 1/{vae.downsampling} of the "
                             f"image size; the model's have {model.in_channels} at 1/{options.VAE_DOWNSAMPLING}")
    if args.model is not None:
        warn(process, f"--model {args.model} has random weights: the images will look like noise "
                      "(pass --ckpt PATH for a trained model)")
    if not pixels and vae is None:
        warn(process, f"no --vae for this latent model (in_channels={model.in_channels}): samples.npz will hold the "
                      "latents ('latents', N x C x H x W float32) and no images are written")
    plan = Plan(model, vae, vae_path, labels, image_size, pixels, 0.0, out_path, None)
    if process.is_main:
        plan.staging = held.enter_context(staging_folder(out_path, run_identity(args, plan, process), args.restart))
    plan.load_seconds = time.perf_counter() - started
    return plan


def pipeline_vae(ckpt) -> str | None:
    """The vae/ folder of a diffusers pipeline root (or of a Hugging Face repo id's cached one), else None."""
    from fastdit.integrations import diffusers_folders, hub

    root = hub.resolve_repo_id(ckpt) if hub.is_repo_id(ckpt) else ckpt
    return diffusers_folders.vae_folder(root) if os.path.isdir(root) else None


def run_identity(args, plan, process) -> dict:
    """Everything that changes the run's samples: a killed run is resumed only by a run of the same identity."""
    model, device = plan.model, process.device
    return {
        "weights": weights_digest(model),
        "config": model_config(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "vae": None if plan.vae is None else weights_digest(plan.vae.autoencoder),
        "labels": hashlib.sha256(np.ascontiguousarray(plan.labels, np.int64).data).hexdigest(),
        "num_samples": len(plan.labels),
        **recorded(sampling_settings(args, model)),
        "batch_size": args.batch_size,
        "parallel": args.parallel,
        "device_type": device.type,
        "kernels": kernel_path(device),
        "attn_backend": model.attn_backend,
        "quantize": args.quantize,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "fastdit": fastdit.__version__,
        "torch": torch.__version__,
    }


def sampling_settings(args, model) -> dict:
    """The keywords of ``fastdit.sample`` that the flags set and that change the images."""
    return {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
            "guidance_channels": args.guidance_channels or default_guidance_channels(model.in_channels)
            or model.in_channels, "seed": args.seed, "spacing": args.ddim_spacing, "final": args.dpm_final,
            "cache": args.cache_policy}


def decoded(plan, latents):
    """A batch's samples as they are saved: uint8 NHWC images, or the latents when there is no VAE."""
    if plan.vae is not None:
        return plan.vae.decode(latents).cpu().numpy()
    if plan.pixels:
        return images.to_uint8(latents)
    return latents.cpu().numpy()


def sample_batches(plan, args, process, missing):
    """Sample this rank's share of the missing batches, each written to the staging folder as it finishes."""
    split = plan.split
    share = distributed.shard(len(missing), split.dp_rank, split.dp_size)
    mine = missing[share.start:share.stop]
    show = process.is_main and not args.no_progress
    settings = sampling_settings(args, plan.model)
    with tqdm(total=sum(map(len, mine)), unit="img", desc="fastdit sample", disable=not show) as bar:
        for batch in mine:
            latents = sample(split.model, torch.from_numpy(plan.labels[batch.start:batch.stop]), **settings,
                             first_index=batch.start, progress=show, compile=args.compile,
                             cuda_graphs=split.cuda_graphs(args.cuda_graphs))
            if split.writes:  # the ranks of a cfg x sp slice hold the same images: one writes them
                plan.staging.write_batch(batch.start, decoded(plan, latents))
            bar.update(len(batch))

"""`fastdit encode`: precompute VAE latents of an image folder for training (``fastdit.train.encode``);
``torchrun --nproc_per_node N -m fastdit encode ...`` splits the shards between N processes."""
import os
import re
import sys

from fastdit import distributed
from fastdit.cli import options
from fastdit.models.vae import VAE
from fastdit.train.data import class_folder_files
from fastdit.train.encode import encode_files
from fastdit.train.shards import LATENT_DTYPES

MAX_SHARD_SIZE = 10**7  # images per shard: a shard is encoded in memory before it is written
SHARD_RECORD = re.compile(r"^shard-\d{5}\.json$")  # written after its shard's files


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="image folder: one sub-directory per class")
    parser.add_argument("--vae", required=True, help="local directory of a diffusers AutoencoderKL")
    parser.add_argument("--out", required=True, help="directory for the latent shards; rerunning the same command "
                                                     "on it resumes an unfinished encode")
    parser.add_argument("--image-size", type=int, default=256, help="images are resized and center-cropped to this "
                        "many pixels, as the release (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call (it encodes both flips; "
                        "default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default: %(default)s)")
    parser.add_argument("--latent-dtype", choices=list(LATENT_DTYPES), default="fp16",
                        help="how latents are stored (default fp16: half of fp32's disk and page cache; "
                             "docs/data.md measures what it changes)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader processes decoding and preprocessing the images per encode process "
                             "(0: in the main process); default min(8, CPU count)")
    parser.add_argument("--prefetch", type=int, default=2,
                        help="batches each worker prepares ahead (default: %(default)s)")
    options.add_device_argument(parser, options.TORCHRUN_DEVICE_HELP)


def kept(args) -> str:
    """What a stopped encode kept, for the line that says so: its finished shards (each has its record)."""
    names = os.listdir(args.out) if os.path.isdir(args.out) else []
    done = sum(bool(SHARD_RECORD.match(name)) for name in names)
    return f"{done} finished shard{'' if done == 1 else 's'} in {args.out}"


def run(args):
    ranges = {"image_size": (1, options.MAX_IMAGE_SIZE), "batch_size": (1, options.MAX_BATCH),
              "shard_size": (1, MAX_SHARD_SIZE), "prefetch": (1, 1024), "workers": (0, options.MAX_WORKERS)}
    for name, (low, high) in ranges.items():
        options.check_range(f"--{name.replace('_', '-')}", getattr(args, name), low, high)
    files, num_classes = class_folder_files(args.data, "--data")
    with distributed.launch(args.device) as process:
        vae = distributed.fail_together(lambda: VAE.load(args.vae, device=process.device), process)
        try:
            result = encode_files(files, num_classes, vae, args.out, args.image_size, args.batch_size,
                                  args.shard_size, args.latent_dtype, args.workers, args.prefetch, process)
        except (ValueError, OSError) as error:
            # One rank's own failure (an unreadable image in its share): `fastdit` prints rank 0's errors only.
            if not process.is_main and getattr(error, "rank", None) == process.rank:
                print(f"fastdit encode: error: rank {process.rank}: {error}", file=sys.stderr)
            raise
    if process.is_main:
        print(f"wrote {len(files)} images' latents to {args.out}: {result['shards']} shard(s), "
              f"{result['encoded']} encoded by this process now, {result['kept']} kept from before")
    return 0

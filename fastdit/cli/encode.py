"""`fastdit encode`: precompute VAE latents of an image folder for training (``fastdit.train.encode``)."""
from fastdit.cli.options import resolve_device
from fastdit.train.data import class_folder_files
from fastdit.train.encode import encode_files
from fastdit.train.vae import VAE


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="image folder: one sub-directory per class")
    parser.add_argument("--vae", required=True, help="local directory of a diffusers AutoencoderKL")
    parser.add_argument("--out", required=True, help="directory for the latent shards")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    parser.add_argument("--device", default=None)


def run(args):
    for flag in ("image_size", "batch_size", "shard_size"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    files, _ = class_folder_files(args.data, "--data")
    vae = VAE.load(args.vae, device=resolve_device(args.device))
    shards = encode_files(files, vae, args.out, args.image_size, args.batch_size, args.shard_size)
    print(f"wrote {len(files)} images' latents in {shards} shard(s) to {args.out}")
    return 0

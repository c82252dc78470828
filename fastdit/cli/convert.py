"""`fastdit convert SRC DST --to diffusers|fastdit|release`: a DiT's weights from one format to another.

SRC is anything fastdit reads: a release ``.pt`` file, a ``.safetensors`` file, a ``save_pretrained``
folder, a diffusers pipeline root or transformer folder, or a Hugging Face repo id in the local cache.
DST is written whole or not at all (a folder is built beside it and renamed into place; a file is
renamed over a temporary) and is never overwritten. The weights keep their dtype.
"""
import os

import torch

from fastdit import reference
from fastdit.integrations.diffusers_folders import is_diffusers_folder, read_diffusers, write_diffusers
from fastdit.integrations.hub import is_repo_id, resolve_repo_id
from fastdit.io import atomic_directory, atomic_path
from fastdit.models import checkpoint
from fastdit.models.config import PAPER_NUM_HEADS, CheckpointError, MissingNumHeadsError

FORMATS = {
    "diffusers": "a diffusers transformer folder (config.json, diffusion_pytorch_model.safetensors)",
    "fastdit": "a fastdit save_pretrained folder (config.json, model.safetensors)",
    "release": "a .pt file holding the release's state dict, as DiT-XL-2-256x256.pt",
}


def add_arguments(parser):
    parser.description = ("Convert a DiT's weights between the release's .pt, fastdit's folders and diffusers' "
                          "folders. Conversion is strict: every tensor is used and checked.")
    parser.add_argument("src", metavar="SRC", help="a .pt or .safetensors file, a fastdit or diffusers folder, or a "
                        "Hugging Face repo id in the local cache (e.g. facebook/DiT-XL-2-256; never downloaded)")
    parser.add_argument("dst", metavar="DST", help="the folder (--to diffusers, fastdit) or file (--to release) to "
                        "write; it must not exist")
    parser.add_argument("--to", required=True, choices=tuple(FORMATS),
                        help="; ".join(f"{name}: {what}" for name, what in FORMATS.items()))
    parser.add_argument("--num-heads", type=int, help="attention heads, for a .pt file (which stores no config) of "
                        "a width the paper does not use; the paper's widths imply theirs")


def run(args):
    destination = os.path.abspath(args.dst)
    if os.path.lexists(destination):
        raise FileExistsError(f"DST: {args.dst} exists; fastdit convert never overwrites: remove it or choose "
                              f"another path")
    model = load_reference(args.src, num_heads=args.num_heads)
    if args.to == "release":
        with atomic_path(destination) as temporary:
            torch.save(model.state_dict(), temporary)
    else:
        write = write_diffusers if args.to == "diffusers" else checkpoint.save_pretrained
        with atomic_directory(destination) as folder:
            write(model, folder)
    print(f"wrote {args.dst}: {FORMATS[args.to]}")
    return 0


def load_reference(source, num_heads: int | None = None) -> reference.DiT:
    """The plain-PyTorch DiT with the weights at ``source`` (any format fastdit reads), loaded strictly;
    ``num_heads`` for a source that does not store it."""
    if is_repo_id(source):
        source = resolve_repo_id(source)
    if not is_diffusers_folder(source):
        try:
            return checkpoint.build(reference.DiT, source,
                                    config=None if num_heads is None else {"num_heads": num_heads})
        except MissingNumHeadsError as error:  # the library's advice is a keyword: here it is a flag
            raise CheckpointError(
                f"--num-heads: {source} stores no config, and its width {error.hidden_size} is not one of the "
                f"paper's ({', '.join(map(str, PAPER_NUM_HEADS))}), whose heads are known: pass "
                "--num-heads N") from None
    state_dict, config = read_diffusers(source)  # already converted strictly: the keys are the model's
    if num_heads not in (None, config["num_heads"]):
        raise ValueError(f"--num-heads: {source} stores num_heads {config['num_heads']}, got {num_heads}")
    with torch.device("meta"):
        model = reference.DiT(**config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()

"""`fastdit digits-accuracy`: how recognisable the digits in a samples.npz are (``fastdit.digits``)."""
import os
import zipfile

import numpy as np

from fastdit.digits import conditioned_class_accuracy


def add_arguments(parser):
    parser.add_argument("samples", help="a samples.npz of `fastdit sample` (images and labels)")


def load_samples(path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a samples.npz, every way it can be wrong named in one line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {'is a directory' if os.path.isdir(path) else 'no such file'}; expected a "
                         "samples.npz of `fastdit sample`")
    # np.load would take a text file for a pickle and say so, which is no help.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a NumPy .npz archive; expected a samples.npz of `fastdit sample`")
    try:
        with np.load(path, allow_pickle=False) as samples:
            names = samples.files
            arrays = {name: samples[name] for name in ("arr_0", "labels") if name in names}
    # A damaged archive raises BadZipFile or EOFError, object arrays (pickles) a ValueError.
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as a NumPy .npz archive ({error})") from None
    missing = [name for name in ("arr_0", "labels") if name not in arrays]
    if missing:
        latents = " (a latent model's samples: digits-accuracy scores pixels)" if "latents" in names else ""
        raise ValueError(f"{path}: expected arrays arr_0 (the images) and labels, a pixel model's samples.npz of "
                         f"`fastdit sample`, but it has no {' and no '.join(missing)}; it has "
                         f"{', '.join(names) or 'no arrays'}{latents}")
    return arrays["arr_0"], arrays["labels"]


def run(args):
    images, labels = load_samples(args.samples)
    try:
        accuracy = conditioned_class_accuracy(images, labels)
    except ValueError as error:
        raise ValueError(f"{args.samples}: {error}") from None
    print(f"{accuracy:.1%} of {len(labels)} samples classified as the digit they were conditioned on")
    return 0

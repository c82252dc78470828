"""`fastdit digits-accuracy`: how recognisable the digits in a samples.npz are (``fastdit.train.digits``)."""
import numpy as np

from fastdit.train.digits import conditioned_class_accuracy


def add_arguments(parser):
    parser.add_argument("samples", help="a samples.npz of `fastdit sample` (images and labels)")


def run(args):
    with np.load(args.samples) as samples:
        images, labels = samples["images"], samples["labels"]
    accuracy = conditioned_class_accuracy(images, labels)
    print(f"{accuracy:.1%} of {len(labels)} samples classified as the digit they were conditioned on")
    return 0

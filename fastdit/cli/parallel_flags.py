"""``--parallel`` for ``fastdit sample``: the flag, its checks before any work, and the split a rank follows.

sample.py calls ``add_arguments(parser)``, ``check_flags(args)`` with its other flag checks, and
``setup(args, process, model)`` once the model is loaded; then it splits its batches with ``split.dp_rank`` and
``split.dp_size`` instead of the process's rank and world size, samples with ``split.model`` and
``split.cuda_graphs(args.cuda_graphs)``, and writes a batch only where ``split.writes``.
"""
import dataclasses
import os

import torch

from fastdit.parallel.mesh import MODES, Layout, layout_from_mesh, make_mesh, parse_spec
from fastdit.parallel.sampling import ParallelDiT


def add_arguments(parser):
    parser.add_argument("--parallel", default="dp", metavar="MODE",
                        help=f"how the processes under torchrun share the work, one of {', '.join(MODES)}: dp "
                        "splits the batches (throughput, the default); cfg runs each batch's conditional and null "
                        "halves on two ranks; sp splits each image's tokens over the ranks (Ulysses); a degree, as "
                        "in sp:2 or cfg+sp:2, leaves the other ranks to dp. docs/parallel.md says when each pays")


def check_flags(args):
    """The --parallel checks that need no process group (the same on every rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    degrees = parse_spec(args.parallel, world_size)
    if degrees["dp"] == world_size:
        return
    if args.cuda_graphs:
        raise ValueError(f"--parallel {args.parallel}: --cuda-graphs is not supported with cfg or sp (each step's "
                         "collectives are not captured); drop it, or use --parallel dp")
    if args.compile:
        raise ValueError(f"--parallel {args.parallel}: --compile is not supported with cfg or sp; drop it, or use "
                         "--parallel dp")
    if args.cache is not None:
        # The cache calls the model's blocks itself, past the split: every rank would run the whole model.
        raise ValueError(f"--parallel {args.parallel}: --cache is not supported with cfg or sp (the cache runs the "
                         "blocks itself, outside the split); drop it, or use --parallel dp")


@dataclasses.dataclass(frozen=True)
class Split:
    """This rank's part: the model to call, its data-parallel rank and size, whether it writes its batches."""

    layout: Layout
    model: torch.nn.Module
    dp_rank: int
    dp_size: int
    writes: bool

    def cuda_graphs(self, requested):
        if self.layout.splits_images:
            return False  # check_flags has refused an explicit --cuda-graphs
        return "auto" if requested is None else requested


def setup(args, process, model) -> Split:
    """Build the mesh over every rank (a collective: every rank calls it) and this rank's Split."""
    if process.world_size == 1:
        return Split(Layout(), model, 0, 1, True)
    layout = layout_from_mesh(make_mesh(args.parallel, process.device.type))
    runner = ParallelDiT(model, layout) if layout.splits_images else model
    return Split(layout, runner, layout.rank("dp"), layout.degree("dp"), layout.leads_its_images)

"""``ParallelDiT`` (one model call over a cfg x sp slice of ranks) and ``parallel_sample`` (a whole run over a
dp x cfg x sp layout), built on ``fastdit.sample`` unchanged.

``sample`` sees a ``ParallelDiT`` as a model: its guided call over [cond; null] is split by the cfg dimension
(rank 0 the conditional half, rank 1 the null half) and all-gathered, each half's forward split by the sp
dimension (``fastdit.parallel.ulysses``). Every rank of the slice then holds the same output and runs the same
solver update, so x stays the same on all of them with no further communication; and since noise is drawn per
image from (seed, image index), the data dimension splits the images and each rank samples its share as one
process would.
"""
import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn

from fastdit.diffusion.sampling import sample
from fastdit.parallel import ulysses
from fastdit.parallel.mesh import Layout, layout_from_group, layout_from_mesh


class ParallelDiT(nn.Module):
    """``model``'s forward run across the cfg and sp ranks of ``layout``; reads as ``model`` otherwise (its
    attributes, parameters and train/eval mode), so ``fastdit.sample`` takes it as a model. Inference only."""

    def __init__(self, model: nn.Module, layout: Layout):
        super().__init__()
        self.model, self.layout = model, layout
        self.train(model.training)  # sample() restores the mode it found on this wrapper, and so on model
        self.wrappers = []
        if layout.sp is not None:
            ulysses.check_model(model, layout.degree("sp"))
            self.wrappers = [ulysses.UlyssesAttention(block.attn, layout.sp) for block in model.blocks]
        parameter = next(model.parameters(), None)
        check_device(parameter.device if parameter is not None else torch.device("cpu"), layout)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, x, t, y):
        if self.layout.cfg is None:
            return self.slice_forward(x, t, y)
        batch, degree, rank = x.shape[0], self.layout.degree("cfg"), self.layout.rank("cfg")
        share = -(-batch // degree)
        # A guided batch [cond; null] splits into its halves. An unguided one splits the same way, and a rank
        # past its end repeats the last image, since all-gathered pieces must have one shape.
        rows = torch.arange(rank * share, (rank + 1) * share, device=x.device).clamp(max=batch - 1)
        out = self.slice_forward(x[rows], t[rows], y[rows])
        return ulysses.all_gather(out, self.layout.cfg, dim=0)[:batch]

    def slice_forward(self, x, t, y):
        if self.layout.sp is None:
            return self.model(x, t, y)
        return ulysses.sequence_parallel(self.model, self.wrappers, self.layout.sp, x, t, y)


def check_device(device: torch.device, layout: Layout):
    """The groups' backend must move the model's tensors: gloo CPU ones, NCCL CUDA ones."""
    for name in ("dp", "cfg", "sp"):
        group = getattr(layout, name)
        if group is None:
            continue
        backend = str(dist.get_backend(group)).lower()
        needed = "nccl" if device.type == "cuda" else "gloo"
        if needed not in backend:
            raise ValueError(f"parallel: the model is on {device}, which needs a {needed} process group, but the "
                             f"{name} group's backend is {backend}")


def resolve_layout(mesh, group, dimension) -> Layout:
    if (mesh is None) == (group is None):
        raise ValueError("parallel_sample: pass mesh (a DeviceMesh named among dp, cfg, sp) or group with "
                         "dimension, one of them")
    if mesh is not None:
        if dimension is not None:
            raise ValueError("parallel_sample: dimension goes with group; a mesh names its own dimensions")
        return layout_from_mesh(mesh)
    return layout_from_group(group, dimension)


def check_same_everywhere(layout: Layout, device, settings):
    """Every rank must be given the same run, or their collectives would pair different steps and images: one
    all-gather of a digest of ``settings`` per dimension names the first rank that differs."""
    digest = int.from_bytes(hashlib.sha256(repr(settings).encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    for name in ("dp", "cfg", "sp"):
        group = getattr(layout, name)
        if group is not None:
            digests = ulysses.all_gather(mine, group, dim=0).tolist()
            if len(set(digests)) > 1:
                other = next(rank for rank, value in enumerate(digests) if value != digest)
                raise ValueError(f"parallel_sample: every rank must be given the same class_labels, seed and "
                                 f"settings; rank {other} of the {name} group was given others than rank "
                                 f"{dist.get_rank(group)}")


def parallel_sample(model, class_labels, *, mesh=None, group=None, dimension=None, seed, first_index=0, noise=None,
                    cuda_graphs="auto", compile=False, cache=None, **settings):
    """``fastdit.sample``'s latents for ``class_labels`` on every rank, computed across the ranks of ``mesh``
    (a DeviceMesh with dimensions named among "dp", "cfg", "sp") or of ``group`` as ``dimension``; equal to one
    process's ``sample(model, class_labels, seed=seed, ...)`` (to fp32 rounding). Every rank passes the same
    arguments; ``seed`` is required (an int) so that it is.

    settings: ``sample``'s sampler, steps, cfg_scale, guidance_channels, eta, progress. CUDA graphs, compile and
    feature caching apply to dp alone: the cfg and sp collectives run between the model's parts, outside what a
    single-device graph or compiled model holds."""
    layout = resolve_layout(mesh, group, dimension)
    if layout.splits_images:
        if cuda_graphs is True:
            raise ValueError("parallel_sample: cuda_graphs=True is not supported with cfg or sp parallelism (each "
                             "step's collectives are not captured); pass cuda_graphs='auto' or False")
        if compile:
            raise ValueError("parallel_sample: compile=True is not supported with cfg or sp parallelism; use dp, "
                             "or compile=False")
        if cache is not None:
            raise ValueError("parallel_sample: cache is not supported with cfg or sp parallelism; use dp, or "
                             "cache=None")
        cuda_graphs = False
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"parallel_sample: seed must be an int, the same on every rank, got {type(seed).__name__}")
    labels = torch.as_tensor(class_labels).cpu()
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    check_device(device, layout)
    check_same_everywhere(layout, device, (labels.tolist(), seed, first_index, sorted(settings.items()),
                                           None if noise is None else noise.sum().item()))
    runner = ParallelDiT(model, layout) if layout.splits_images else model
    dp_degree, dp_rank = layout.degree("dp"), layout.rank("dp")
    share = -(-len(labels) // dp_degree)
    start, stop = min(dp_rank * share, len(labels)), min((dp_rank + 1) * share, len(labels))
    if start < stop:
        latents = sample(runner, labels[start:stop], seed=seed, first_index=first_index + start,
                         noise=None if noise is None else noise[start:stop], cuda_graphs=cuda_graphs,
                         compile=compile, cache=cache, **settings)
    else:  # more data ranks than images: this one's share is empty
        size = model.input_size
        latents = torch.empty(0, model.in_channels, size, size, device=device)
    if layout.dp is None:
        return latents
    # All-gathered pieces must have one shape: pad each share to the largest, then drop the padding.
    padded = torch.cat([latents, latents.new_zeros(share - latents.shape[0], *latents.shape[1:])])
    pieces = ulysses.all_gather(padded, layout.dp, dim=0).split(share)
    return torch.cat([piece[:max(0, min(share, len(labels) - rank * share))] for rank, piece in enumerate(pieces)])

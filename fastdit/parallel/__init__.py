"""One image over many devices: CFG-parallel and Ulysses sequence-parallel sampling, composed with data
parallelism on a DeviceMesh, over torch.distributed (gloo on CPUs, NCCL on GPUs). See docs/parallel.md."""
from fastdit.parallel.mesh import DIMENSIONS, MODES, Layout, layout_from_group, layout_from_mesh, make_mesh
from fastdit.parallel.sampling import ParallelDiT, parallel_sample

__all__ = ["DIMENSIONS", "MODES", "Layout", "ParallelDiT", "layout_from_group", "layout_from_mesh", "make_mesh",
           "parallel_sample"]

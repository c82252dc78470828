"""Which ranks split what: a ``Layout`` names the process group of each parallel dimension.

- ``dp``: data parallel, whole images split over the ranks (throughput);
- ``cfg``: CFG parallel, the conditional and the null half of a guided batch on two ranks (latency);
- ``sp``: Ulysses sequence parallel, each image's tokens split over the ranks (latency).

The dimensions compose on a DeviceMesh whose dimension names are among these three; ``make_layout`` builds one from
a spec such as ``"cfg+sp"`` or ``"sp:2"`` (the ranks the named dimensions leave over go to ``dp``). The sequence
dimension is the innermost (adjacent ranks, on one node under torchrun) because its all-to-alls run in every
block, the CFG dimension's all-gather once per step, and the data dimension's once per call.
"""
import dataclasses

import torch
import torch.distributed as dist

DIMENSIONS = ("dp", "cfg", "sp")  # outermost first
MODES = ("dp", "cfg", "sp", "cfg+sp")  # the spellings the CLI documents; "sp:2"-style degrees are also read
CFG_DEGREE = 2  # the conditional and the null half


@dataclasses.dataclass(frozen=True)
class Layout:
    """The process group of each dimension; None for a dimension of degree 1 (no communication)."""

    dp: object = None
    cfg: object = None
    sp: object = None

    def degree(self, dimension: str) -> int:
        group = getattr(self, dimension)
        return 1 if group is None else dist.get_world_size(group)

    def rank(self, dimension: str) -> int:
        group = getattr(self, dimension)
        return 0 if group is None else dist.get_rank(group)

    @property
    def splits_images(self) -> bool:
        """Whether the cfg or sp dimension splits one image's work (a model call spans several ranks)."""
        return self.cfg is not None or self.sp is not None

    @property
    def leads_its_images(self) -> bool:
        """Rank 0 of its cfg x sp slice: the one rank of those sharing images that writes them out."""
        return self.rank("cfg") == 0 and self.rank("sp") == 0

    def __str__(self):
        return " x ".join(f"{name} {self.degree(name)}" for name in DIMENSIONS)


def parse_spec(spec: str, world_size: int) -> dict:
    """``spec`` ("dp", "cfg", "sp", "cfg+sp", a degree as in "sp:2") -> the degree of each dimension."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"parallel: expected one of {', '.join(MODES)} (a degree as in sp:2), got {spec!r}")
    degrees = {}
    for part in spec.split("+"):
        name, _, degree = part.partition(":")
        if name not in DIMENSIONS or name in degrees:
            raise ValueError(f"parallel: expected one of {', '.join(MODES)} (each at most once, a degree as in sp:2), "
                             f"got {spec!r}")
        if degree and (not degree.isdigit() or int(degree) < 1):
            raise ValueError(f"parallel: a degree must be a positive integer, got {part!r} in {spec!r}")
        if name == "dp" and degree:
            raise ValueError(f"parallel: dp takes the ranks the other dimensions leave; give no degree, got {part!r}")
        degrees[name] = int(degree) if degree else None
    cfg = 1
    if "cfg" in degrees:
        cfg = degrees["cfg"] or CFG_DEGREE
        if cfg != CFG_DEGREE:
            raise ValueError(f"parallel: the cfg degree must be {CFG_DEGREE} (the conditional and the null half), "
                             f"got {cfg}")
    if world_size % cfg:
        raise ValueError(f"parallel {spec}: the cfg degree {cfg} must divide the world size, got {world_size} "
                         "processes")
    sp = 1
    if "sp" in degrees:
        sp = degrees["sp"] or world_size // cfg
    if world_size % (cfg * sp):
        raise ValueError(f"parallel {spec}: cfg degree {cfg} x sp degree {sp} must divide the world size, got "
                         f"{world_size} processes")
    return {"dp": world_size // (cfg * sp), "cfg": cfg, "sp": sp}


def check_backend(backend: str):
    """One clear line when torch cannot run ``backend`` here."""
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available}
    if backend not in available:
        raise ValueError(f"parallel backend: expected gloo (CPU) or nccl (CUDA), got {backend!r}")
    if not dist.is_available() or not available[backend]():
        raise ValueError(f"parallel backend: {backend} is not available in this torch build "
                         f"({torch.__version__}); use {'gloo on the CPU' if backend == 'nccl' else 'nccl on CUDA'}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel backend: nccl needs CUDA devices, and this machine has none; use gloo on the CPU")


def make_mesh(spec: str, device_type: str = "cpu"):
    """The DeviceMesh (dp, cfg, sp) for ``spec`` over all the processes of the default group (started by torchrun
    or ``dist.init_process_group``), of ``device_type`` ("cpu": gloo, "cuda": NCCL)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"parallel {spec}: no process group; start the processes with torchrun (or call "
                         "torch.distributed.init_process_group first)")
    degrees = parse_spec(spec, dist.get_world_size())
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"parallel: device_type must be 'cpu' or 'cuda', got {device_type!r}")
    check_backend("nccl" if device_type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, tuple(degrees[name] for name in DIMENSIONS), mesh_dim_names=DIMENSIONS)


def layout_from_mesh(mesh) -> Layout:
    """A DeviceMesh whose dimensions are named among dp, cfg and sp (any order, any subset)."""
    names = mesh.mesh_dim_names
    if not names or any(name not in DIMENSIONS for name in names) or len(set(names)) != len(names):
        raise ValueError(f"mesh: its dimensions must be named among {', '.join(DIMENSIONS)} (each once), got "
                         f"{names}")
    groups = {name: mesh.get_group(name) for name in names if mesh.size(names.index(name)) > 1}
    return _checked(Layout(**groups))


def layout_from_group(group, dimension: str) -> Layout:
    """One process group (``dist.group.WORLD`` or a ``dist.new_group``) used as the ``dimension`` dimension."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"parallel: with a process group, expected one of {', '.join(DIMENSIONS)}, got "
                         f"{dimension!r}")
    if group is None or dist.get_world_size(group) == 1:
        return Layout()
    return _checked(Layout(**{dimension: group}))


def _checked(layout: Layout) -> Layout:
    if layout.degree("cfg") not in (1, CFG_DEGREE):
        raise ValueError(f"parallel: the cfg degree must be {CFG_DEGREE} (the conditional and the null half), got "
                         f"{layout.degree('cfg')}")
    return layout

"""Which implementation of the fused ops runs on a given device, and what that device offers.

The Triton kernels run natively on CUDA GPUs of compute capability 8.0 or newer (bf16
``tl.dot`` needs sm_80) and, when ``TRITON_INTERPRET=1`` is set before import, under
Triton's CPU interpreter (how the tests exercise them without a GPU). Anywhere else each op
falls back to its torch function, which computes the same math (fp32 accumulation, one
rounding at the end).

Launch configurations depend on the GPU (its shared memory above all), so launchers ask
``gpu_spec`` rather than torch.cuda. ``simulate(spec)`` makes meta-device tensors take the
Triton path as if on that GPU: ``python -m fastdit.tools.aot`` records the launches a
model really makes that way, without a GPU.
"""
import contextlib
import contextvars
import dataclasses
import os

import torch

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_PATHS = ("triton", "triton-interpreter", "torch")

# bf16 tl.dot (and the fp32 -> bf16 conversions the kernels round through) need Ampere.
MIN_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """What a launch configuration depends on: the compute capability, the shared memory one
    block may use (the opt-in maximum, bytes) and the number of SMs."""

    name: str
    capability: tuple[int, int]
    shared_memory: int
    multiprocessors: int

    @property
    def arch(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


# The GPUs the AOT check compiles for, from NVIDIA's datasheets and CUDA's occupancy tables:
# sm_90 allows 227 KiB of shared memory per block, sm_80 163 KiB (sm_86/89: 99 KiB).
TARGETS = {
    90: GPUSpec("H100 (sm_90)", (9, 0), 227 * 1024, 132),
    80: GPUSpec("A100 (sm_80)", (8, 0), 163 * 1024, 108),
}

_simulated: contextvars.ContextVar[GPUSpec | None] = contextvars.ContextVar("simulated_gpu", default=None)


@contextlib.contextmanager
def simulate(spec: GPUSpec):
    """Within the block, meta tensors take the Triton path and launchers configure for ``spec``."""
    token = _simulated.set(spec)
    try:
        yield spec
    finally:
        _simulated.reset(token)


def simulated() -> GPUSpec | None:
    return _simulated.get()


def gpu_spec(device: torch.device) -> GPUSpec:
    """The GPU that tensors on ``device`` live on (or the simulated one)."""
    spec = _simulated.get()
    if spec is not None:
        return spec
    props = torch.cuda.get_device_properties(device)
    return GPUSpec(props.name, (props.major, props.minor), props.shared_memory_per_block_optin,
                   props.multi_processor_count)


def kernel_path(device: torch.device | str | None = None) -> str:
    """Name of the path the fused ops take for tensors on ``device``.

    ``"triton"`` (compiled kernels on a CUDA GPU of compute capability >= 8.0),
    ``"triton-interpreter"`` (the same kernels interpreted on the CPU) or ``"torch"``
    (plain torch math: CPUs, and GPUs older than Ampere).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if TRITON_INTERPRET:
        return "triton-interpreter"
    if device.type == "meta" and _simulated.get() is not None:
        return "triton"
    if device.type == "cuda" and gpu_spec(device).capability >= MIN_CAPABILITY:
        return "triton"
    return "torch"


def use_triton(tensor: torch.Tensor) -> bool:
    return kernel_path(tensor.device) != "torch"


def device_guard(tensor: torch.Tensor):
    """Make the tensor's GPU current: Triton launches on the current device and its stream,
    so without this a tensor on cuda:1 would be run by a kernel launched on cuda:0."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()

"""What the benchmark files share: the device and its precision, group names, the implementations
of a single op (those of fastdit.bench.workloads, on an op instead of a model), and one model
configuration with its reference outputs."""
import torch
import torch.nn.functional as F
from fastdit.kernels import kernel_path
from parity import KERNEL_TOLERANCE, MODEL_TOLERANCE, assert_parity, relative_max_error

from fastdit.bench.workloads import (
    BASELINE,
    WORKLOAD_BUILDERS,
    Inputs,
    ModelSet,
    compiled,
    cuda_graphed,
    dtype_name,
    implementation_dtype,
)
from fastdit.reference import modulate

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # each device's fast precision
KERNEL_PATH = kernel_path(DEVICE)

def group_name(operation: str, shape: str) -> str:
    """e.g. "modulate_layernorm B32 T256 D1152 bf16 [cuda, fused ops: triton]"."""
    return f"{operation} {shape} {dtype_name(DTYPE)} [{DEVICE.type}, fused ops: {KERNEL_PATH}]"


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def random_inputs(*shapes, seed=0) -> list[torch.Tensor]:
    """fp32 normal tensors on the device, rounded through bf16 so that every precision holds
    them exactly: all implementations see the same values, and fp32 math on them is the oracle."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(torch.bfloat16).float().to(DEVICE) for shape in shapes]


def op_implementation(implementation, reference_op, fastdit_op, inputs):
    """(fn, dtype) for ``implementation`` of one op: the reference model's torch code or
    fastdit's fused op, on ``inputs`` cast to the implementation's dtype."""
    dtype = implementation_dtype(implementation, DTYPE)
    cast = [tensor.to(dtype) for tensor in inputs]
    op = reference_op if implementation.startswith("reference") else fastdit_op
    if implementation.endswith("-compiled"):
        op = compiled(op, DEVICE)

    def fn():
        return op(*cast)

    return (cuda_graphed(fn, DEVICE) if implementation == "fastdit-cudagraphs" else fn), dtype


def reference_modulate_layernorm(x, shift, scale):
    """The reference model's norm + modulate, as its DiTBlock runs them (eps 1e-6, no affine)."""
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale)


def op_tolerance(implementation: str, dtype: torch.dtype) -> float:
    """A fused op or a library kernel rounds once: the kernel bound. The reference model's eager ops
    round after every op (in bf16 its softmax probabilities alone reach 1.8e-2 at 4096 tokens), so
    they are held to the bound the project promises for a composition of ops, the model's."""
    return (MODEL_TOLERANCE if implementation.startswith("reference") else KERNEL_TOLERANCE)[dtype]


def check_outputs(actual, expected, tolerance, what) -> float:
    """assert_parity on each output of an op (a tensor or a tuple of them); the largest error."""
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, the reference has {len(expected)}"
    for index, (out, reference) in enumerate(zip(actual, expected)):
        assert_parity(out, reference, tolerance, f"{what} output {index}")
    return max(relative_max_error(out, reference) for out, reference in zip(actual, expected))


class ModelCase:
    """One model configuration of a benchmark file: its models, a batch, and the reference's
    output of each workload (computed once)."""

    def __init__(self, name: str, image_size: int, batch: int):
        self.name, self.image_size, self.batch = name, image_size, batch
        self.models = ModelSet(name, image_size // 8, DTYPE, DEVICE)
        self.inputs = Inputs.draw(batch, self.models.reference, DEVICE)
        self._expected = {}

    def expected(self, workload, compute=None):
        """The baseline's output of ``workload`` (of fastdit.bench.workloads, or any name with its
        ``compute()``), computed once."""
        if workload not in self._expected:
            compute = compute or WORKLOAD_BUILDERS[workload](self.models, BASELINE, self.inputs).output
            self._expected[workload] = compute()
        return self._expected[workload]

    def close(self):
        """Drop the models, so that the next configuration has the memory."""
        self.models = self.inputs = None
        self._expected.clear()

    def group(self, workload):
        return group_name(workload, f"{self.name} {self.image_size}px batch {self.batch}")

    def __repr__(self):
        return f"{self.name}-{self.image_size}px-x{self.batch}"

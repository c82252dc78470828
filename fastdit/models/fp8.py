"""FP8 inference: the blocks' four big GEMMs (qkv, attention projection, fc1, fc2) in E4M3.

They are most of a forward's predicted time at bf16's peak (docs/performance.md); FP8 tensor cores
run them at twice that rate. Weights are quantized once, per output channel (a row of the weight and
its fp32 scale); activations per token, dynamically, at each call (a row's max over 448, E4M3's
largest value): DiT's activations have large per-token outliers, so a scale per row keeps the other
rows' precision. ``torch._scaled_mm`` multiplies with those row-wise scales and the bias, with bf16
output. Attention, the norms, the residual stream, the embedders, the adaLN GEMM and the final layer
stay bf16: they are few FLOPs or, for attention, need the softmax's range. So every ``attn_backend``
takes a quantized model: each gets the bf16 q, k and v it gets from a bf16 one.

The kernels that produce a GEMM's input write it quantized, in the same pass (a ``QuantizedActivation``):
- qkv's: the first block's from ``modulate_layernorm_fp8``, every later block's from the previous block's
  fused residual + LayerNorm + modulation (``gated_residual_modulate_layernorm_fp8``);
- fc1's: the fused residual + LayerNorm + modulation after attention (the same op);
- fc2's: the GELU of fc1's bf16 output (``gelu_fp8``): ``_scaled_mm`` has no GELU epilogue, so fc1 writes
  bf16 and one pass applies the GELU and quantizes.
One separate quantization pass remains per block, in ``FP8Linear`` itself: the attention output before the
projection. Its per-token scale is the max over all heads of the token, and the flash kernel computes each
head in a different program, so no program sees a whole row; a cross-program max would cost a pass anyway.
(Under ``torch.compile`` inductor fuses that pass into one kernel; eagerly it is a few launches.) In the
cross-attention design the second norm's output feeds a bf16 linear (cross-attention's q): it stays bf16.
The final layer's input stays bf16 too.

The CPU runs the same code, for the tests; on CUDA it needs sm_89 or newer.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

from fastdit.kernels import runtime
from fastdit.kernels.rows import FP8, FP8_MAX, quantize_rows  # noqa: F401 (FP8, FP8_MAX: this module's API)

QUANTIZATIONS = ("fp8",)
QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class QuantizedActivation(NamedTuple):
    """A GEMM input quantized per token: E4M3 ``values`` (..., D) and fp32 ``scales`` (..., 1), so that
    ``values * scales`` approximates it; made by the fused kernels for an ``FP8Linear``."""

    values: torch.Tensor
    scales: torch.Tensor

    def map(self, function):
        """The same per-token ``function`` (a slice or a pad over tokens) applied to values and scales."""
        return QuantizedActivation(function(self.values), function(self.scales))


class FP8Linear(nn.Module):
    """A bf16 ``nn.Linear``'s function with an E4M3 weight (per output channel scales) and E4M3 inputs
    (per token scales), bf16 out. Inference only: it has no backward.

    Its input is a ``QuantizedActivation``, or a bf16 tensor, which it quantizes itself."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, weight_scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.t().contiguous())  # (1, out): _scaled_mm's layout
        self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16))

    def forward(self, x):
        if not isinstance(x, QuantizedActivation):
            x = QuantizedActivation(*quantize_rows(x))
        shape = x.values.shape
        values, scale = x.values.reshape(-1, self.in_features), x.scales.reshape(-1, 1)
        # weight.t(): the column-major second operand _scaled_mm requires on CUDA
        out = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=torch.bfloat16)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, E4M3 weight, per-token E4M3 input"


def check_quantize(quantize) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize: expected one of {', '.join(map(repr, QUANTIZATIONS))} or None, got {quantize!r}")


def check_fp8_device(device: torch.device) -> None:
    """FP8 tensor cores: CUDA sm_89 (Ada) or newer; the CPU runs the same math for the tests, and meta tensors
    stand for a simulated sm_89+ GPU (``python -m fastdit.tools.aot`` records the FP8 launches so)."""
    if device.type == "cpu":
        return
    simulated = runtime.simulated()
    if device.type == "meta" and simulated is not None and simulated.capability >= (8, 9):
        return
    if device.type != "cuda":
        raise ValueError(f"quantize='fp8': runs on CUDA GPUs of compute capability 8.9 or newer (and on the CPU), "
                         f"the model is on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"quantize='fp8': needs a GPU of compute capability 8.9 or newer (Ada, Hopper, "
                         f"Blackwell), {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")


def quantize_(model, quantize: str) -> None:
    """Replace the blocks' qkv, attention projection, fc1 and fc2 of the bf16 ``model`` by ``FP8Linear``s."""
    check_quantize(quantize)
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"quantize: the model is already quantized to {model.quantization}")
    parameter = next(model.parameters())
    if parameter.dtype != torch.bfloat16:
        raise ValueError(f"quantize='fp8': quantizes a bfloat16 model (its other layers and the FP8 GEMMs' output "
                         f"are bf16), the model is {parameter.dtype}: model.to(torch.bfloat16) first")
    check_fp8_device(parameter.device)
    targets = [(f"blocks.{index}.{name}", block.get_submodule(name)) for index, block in enumerate(model.blocks)
               for name in QUANTIZED_LINEARS]
    for name, linear in targets:
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"quantize='fp8': FP8 GEMMs need in and out features divisible by 16, {name} is "
                             f"({linear.in_features}, {linear.out_features})")
    for name, linear in targets:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, FP8Linear(linear))
    model.quantization = quantize
    model.eval().requires_grad_(False)

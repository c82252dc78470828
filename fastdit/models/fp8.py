"""FP8 inference: the blocks' four big GEMMs (qkv, attention projection, fc1, fc2) in E4M3.

They are most of a forward's predicted time at bf16's peak (docs/performance.md); FP8 tensor cores
run them at twice that rate. Weights are quantized once, per output channel (a row of the weight and
its fp32 scale); activations per token, dynamically, at each call (a row's max over 448, E4M3's
largest value): DiT's activations have large per-token outliers, so a scale per row keeps the other
rows' precision. ``torch._scaled_mm`` multiplies with those row-wise scales and the bias, with bf16
output. Attention, the norms, the residual stream, the embedders, the adaLN GEMM and the final layer
stay bf16: they are few FLOPs or, for attention, need the softmax's range. So every ``attn_backend``
takes a quantized model: each gets the bf16 q, k and v it gets from a bf16 one.

Each GEMM's input is quantized by a torch pass of its own (``quantize_rows``): the fused Triton kernels
that produce qkv's and fc1's inputs, the GELU before fc2 and attention before the projection still
write bf16 (under ``torch.compile`` inductor fuses each pass into one kernel; eagerly it is a few
launches). The CPU runs the same code, for the tests; on CUDA it needs sm_89 or newer.
"""
import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
QUANTIZATIONS = ("fp8",)
QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values, fp32 scale per row) of a 2-D tensor: ``values * scale`` approximates ``tensor``."""
    amax = tensor.abs().amax(dim=-1, keepdim=True).float()
    # A row of zeros gets a tiny scale, not a division by zero: its values stay zero.
    scale = amax.clamp_min(1e-12) / FP8_MAX
    return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    """A bf16 ``nn.Linear``'s function with an E4M3 weight (per output channel scales) and E4M3 inputs
    (per token scales), bf16 out. Inference only: it has no backward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, weight_scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.t().contiguous())  # (1, out): _scaled_mm's layout
        self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16))

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        values, scale = quantize_rows(rows)
        # weight.t(): the column-major second operand _scaled_mm requires on CUDA
        out = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=torch.bfloat16)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, E4M3 weight, per-token E4M3 input"


def check_quantize(quantize) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize: expected one of {', '.join(map(repr, QUANTIZATIONS))} or None, got {quantize!r}")


def check_fp8_device(device: torch.device) -> None:
    """FP8 tensor cores: CUDA sm_89 (Ada) or newer; the CPU runs the same math for the tests."""
    if device.type == "cpu":
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

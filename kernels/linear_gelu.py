"""DiT's MLP input layer, ``GELU_tanh(x @ fc1.weight^T + fc1.bias)``, as one GEMM with the GELU in its
epilogue, and its backward.

Unfused, the GELU is a pass of its own over the MLP's 4x-wide activations: it reads the GEMM's
output and writes it again, about 12% of a forward's predicted time (docs/performance.md). On CUDA
``torch._addmm_activation(..., use_gelu=True)`` applies it in cuBLASLt's epilogue, whose GELU is the
tanh approximation DiT uses. On the CPU the same call computes the exact erf GELU (4.7e-4 from tanh),
so there the op computes the GEMM and the tanh GELU apart: the CPU runs the same math, not the same
launches, and says nothing about the epilogue's numerics (the GPU run checks those).

Backward: the epilogue does not write the pre-activation GELU's derivative needs, so the backward
recomputes it with the forward's GEMM. It saves no 4x-wide tensor (only x, which the weight's
gradient needs anyway): per block (rows x 4D) values fewer than the unfused pair keeps, for one
more GEMM in the backward. The model trains on the unfused pair, whose saved pre-activation costs
less time than that GEMM (see ``fastdit.models.dit.Mlp``).
"""
import os

import torch
import torch.nn.functional as F

from .launch import check_same_device, input_error

# FASTDIT_FUSED_GELU=0 keeps the GELU a pass of its own: the benchmarks' switch for measuring the fusion.
FUSED = os.environ.get("FASTDIT_FUSED_GELU", "1") != "0"


def gelu_epilogue(device: torch.device) -> bool:
    """Whether the GEMM applies the GELU in its epilogue on ``device``: on CUDA only (see the module's doc)."""
    return device.type == "cuda"


def linear_gelu_reference(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def _check(x, weight, bias):
    op = "linear_gelu"
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise input_error(ValueError, op, "weight", f"be (out_features, {x.shape[-1]}) for x of shape "
                          f"{tuple(x.shape)}", tuple(weight.shape))
    if bias.shape != (weight.shape[0],):
        raise input_error(ValueError, op, "bias", f"have shape ({weight.shape[0]},)", tuple(bias.shape))
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor.dtype != x.dtype:
            raise input_error(TypeError, op, name, f"have x's dtype ({x.dtype})", tensor.dtype)
        check_same_device(op, name, tensor, "x", x)


@torch.library.custom_op("fastdit::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GELU_tanh(x @ weight^T + bias)`` for x (..., in_features), weight (out_features, in_features)."""
    _check(x, weight, bias)
    if gelu_epilogue(x.device):
        rows = x.reshape(-1, x.shape[-1])
        return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.shape[0])
    return linear_gelu_reference(x, weight, bias)


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_gelu_backward(grad, x, weight, bias):
    """(grad_x, grad_weight, grad_bias), the pre-activation recomputed by the forward's GEMM."""
    pre_activation = F.linear(x, weight, bias)
    grad_pre = torch.ops.aten.gelu_backward(grad, pre_activation, approximate="tanh")
    rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_pre.reshape(-1, grad_pre.shape[-1])
    return grad_pre @ weight, grad_rows.t() @ rows, grad_rows.sum(0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return linear_gelu_backward(grad, *ctx.saved_tensors)


linear_gelu.register_autograd(_backward, setup_context=_setup_context)

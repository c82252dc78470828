"""The FP8 baseline a user would otherwise pick: the release's model (``fastdit.reference`` with its attention
on SDPA, as timm's) in bf16, its linears quantized by torchao's
``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (E4M3 weights with a scale per output
channel, activations with a scale per token, computed dynamically: the granularity of ``fastdit.models.fp8``),
then compiled, as torchao's FP8 inference is meant to run.

torchao quantizes every ``nn.Linear`` by default, the embedders', adaLN's and the final layer's included: that
is what the one-line recipe does, and what the row measures. fastdit does not depend on torchao: the row runs
where it is installed (``pip install --no-deps torchao``; benchmarks/README.md carries its wheel to a device
run) and on a CUDA GPU of compute capability 8.9 or newer, the only place torchao's FP8 runs.
"""
import importlib.util

import torch

from fastdit.models.fp8 import check_fp8_device

TORCHAO_FP8 = "torchao-fp8"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the torchao row cannot run on ``device``; None if it can."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install --no-deps torchao; fastdit does not depend on it)"
    if device.type != "cuda":
        return "torchao's FP8 runs on CUDA GPUs of compute capability 8.9 or newer only"
    try:
        check_fp8_device(device)
    except ValueError as error:
        return str(error)
    return None


def quantize_(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (bf16, on its GPU) with every linear in torchao's row-wise dynamic FP8."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization import quantize_ as torchao_quantize_

    torchao_quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return model

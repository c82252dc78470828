"""The FP8 inference path (fastdit.models.fp8): the same code on the CPU as on an sm_89+ GPU."""
import copy
from unittest import mock

import pytest
import torch
from parity import assert_parity, perturb_, relative_max_error
from torch.utils._python_dispatch import TorchDispatchMode

import fastdit
from fastdit import reference
from fastdit.bench.fp8_numerics import fp8_errors
from fastdit.diffusion.caching import FORA, FirstBlockCache
from fastdit.diffusion.sampling import sample
from fastdit.models import fp8
from fastdit.models.fp8 import FP8, FP8Linear, QuantizedActivation, quantize_rows

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def models(block="adaln-zero"):
    ref = perturb_(reference.DiT(**TINY, block=block)).eval()
    fast = fastdit.DiT(**TINY, block=block).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast.to(torch.bfloat16)


def inputs(t=500):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([t, t]), torch.tensor([1, 10])


def test_quantize_rows_per_row_scales():
    rows = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 1e3, 0.0, 7.0])[:, None]  # outliers per row
    values, scale = quantize_rows(rows)
    assert values.dtype == FP8 and scale.shape == (5, 1) and scale.dtype == torch.float32
    restored = values.float() * scale
    for row in (0, 1, 2, 4):  # E4M3 keeps 3 mantissa bits: within 1/16 of each row's largest value
        assert (restored[row] - rows[row]).abs().max() <= rows[row].abs().max() / 16
    assert torch.equal(restored[3], rows[3])  # a row of zeros stays zeros
    assert values.float().abs().amax(1)[[0, 1, 2, 4]].eq(fp8.FP8_MAX).all()  # each row uses the full range


def test_fp8_linear_matches_bf16_linear():
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    out = FP8Linear(linear)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 7, 96)
    assert_parity(out, linear(x).float(), 0.08, "FP8 linear")
    # an input quantized by its producer gives what quantizing it here gives
    assert torch.equal(FP8Linear(linear)(QuantizedActivation(*quantize_rows(x))), out)


# Measured 6.7e-3 (t = 0) and 7.5e-3 (t = 999) against the reference, 1.0e-2 and 8.1e-3 against bf16, bf16's own
# 5.2e-3 and 6.2e-3; a 25% error in the activations' scales fails it.
FP8_BOUND = 0.02


def test_quantized_model_close_to_bf16_and_reference():
    ref, fast = models()
    quantized = copy.deepcopy(fast).quantize("fp8")
    assert quantized.quantization == "fp8" and not quantized.training
    assert isinstance(quantized.blocks[1].mlp.fc2, FP8Linear) and isinstance(quantized.blocks[0].attn.qkv, FP8Linear)
    assert not isinstance(quantized.final_layer.linear, FP8Linear)
    with torch.no_grad():
        for t in (0, 999):
            expected, half, out = ref(*inputs(t)), fast(*inputs(t)), quantized(*inputs(t))
            assert out.dtype == torch.bfloat16
            assert relative_max_error(out, expected) < FP8_BOUND and relative_max_error(out, half) < FP8_BOUND
        forward = FP8Linear.forward

        def wrong_scales(linear, x):  # every GEMM input's scales 25% off, whoever quantized it
            x = x if isinstance(x, QuantizedActivation) else QuantizedActivation(*quantize_rows(x))
            return forward(linear, QuantizedActivation(x.values, 1.25 * x.scales))

        with mock.patch.object(FP8Linear, "forward", wrong_scales):
            assert relative_max_error(quantized(*inputs(0)), ref(*inputs(0))) > FP8_BOUND  # a wrong scale fails


class CountedOps(TorchDispatchMode):
    """Counts the ops a forward dispatches (a custom op counts once: its own ops run below the mode)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# The bf16 ungated designs drift further from the adaLN-Zero's: measured FP8 vs bf16 at t = 500, 5.6e-3 (adaln-zero),
# 5.0e-2 (adaln), 6.3e-2 (cross-attn), 5.1e-2 (in-context); before the fused quantization, 5.7e-3 to 5.9e-2.
DESIGN_BOUND = 0.1


@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn", "in-context"])
def test_every_block_design_quantizes_in_the_fused_ops(block):
    """The GEMM inputs come quantized from the fused ops (the first norm, each residual + norm that feeds an FP8
    GEMM, the GELU), and only the attention outputs are quantized apart (one row max each); the final layer's and
    cross-attention's q's inputs stay bf16."""
    _, fast = models(block)
    quantized = copy.deepcopy(fast).quantize("fp8")
    depth, norms = TINY["depth"], 3 if block == "cross-attn" else 2
    with torch.no_grad(), CountedOps() as ops:
        out = quantized(*inputs())
    assert ops.counts.get("modulate_layernorm_fp8") == 1 and "modulate_layernorm" not in ops.counts
    fused = ops.counts.get("gated_residual_modulate_layernorm_fp8")
    assert fused == 2 * depth - 1 and ops.counts["gated_residual_modulate_layernorm"] == (norms - 2) * depth + 1
    assert ops.counts["gelu_fp8"] == depth and ops.counts["_scaled_mm"] == 4 * depth
    assert ops.counts["amax"] == depth  # attention outputs only
    with torch.no_grad():
        assert relative_max_error(out, fast(*inputs())) < DESIGN_BOUND


def test_forward_in_parts_and_feature_caches():
    """The feature caches' parts (run_blocks over 0..1 then 1..depth; the final layer's input from normed_input)
    give the one forward's output bit for bit, and caches that skip nothing give exact sampling's."""
    _, fast = models()
    quantized = fast.quantize("fp8")
    with torch.no_grad():
        x0, h, modulations = quantized.embed(*inputs())
        assert isinstance(h, QuantizedActivation)
        x1, h1 = quantized.run_blocks(x0, h, modulations, 0, 1)
        assert isinstance(h1, QuantizedActivation)
        x, h = quantized.run_blocks(x1, h1, modulations, 1, TINY["depth"])
        assert torch.is_tensor(h) and torch.equal(h, quantized.normed_input(x, modulations, TINY["depth"]))
        assert torch.equal(quantized.final_output(h), quantized(*inputs()))
    settings = {"sampler": "ddim", "steps": 2, "cfg_scale": 4.0, "seed": 0}
    exact = sample(quantized, [1, 2], **settings)
    for policy in (FORA(interval=1), FirstBlockCache(threshold=0.0)):
        assert torch.equal(sample(quantized, [1, 2], cache=policy, **settings), exact), policy


def test_compiles_with_no_graph_break():
    _, fast = models()
    quantized = fast.quantize("fp8")
    compiled = torch.compile(quantized, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(*inputs()), quantized(*inputs()))


def test_load_with_quantize(tmp_path):
    _, fast = models()
    fast.save_pretrained(tmp_path / "bf16")
    loaded = fastdit.load(tmp_path / "bf16", quantize="fp8")
    assert loaded.quantization == "fp8" and next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), copy.deepcopy(fast).quantize("fp8")(*inputs()))


def test_bad_input_one_line(tmp_path):
    ref, fast = models()
    fast.save_pretrained(tmp_path / "bf16")
    cases = [
        (lambda: copy.deepcopy(fast).quantize("int8"), "quantize: expected one of 'fp8' or None, got 'int8'"),
        (lambda: fastdit.load(tmp_path / "bf16", quantize="fp4"), "quantize: expected one of 'fp8' or None"),
        (lambda: fastdit.load(tmp_path / "bf16", quantize="fp8", dtype=torch.float32),
         "dtype: quantize='fp8' runs the model in torch.bfloat16, got torch.float32"),
        (lambda: fastdit.DiT(**TINY).quantize("fp8"), "quantize='fp8': quantizes a bfloat16 model"),
        (lambda: copy.deepcopy(fast).quantize("fp8").quantize("fp8"), "quantize: the model is already quantized"),
        (lambda: copy.deepcopy(fast).quantize("fp8").train(), "train: the model is quantized to fp8, for inference"),
        (lambda: copy.deepcopy(fast).quantize("fp8").save_pretrained(tmp_path / "q"),
         "save_pretrained: the model is quantized to fp8; save the bf16 model and load it with quantize='fp8'"),
        (lambda: fastdit.DiT(**{**TINY, "hidden_size": 40, "num_heads": 2}).to(torch.bfloat16).quantize("fp8"),
         r"quantize='fp8': FP8 GEMMs need in and out features divisible by 16, blocks.0.attn.qkv is \(40, 120\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    assert not (tmp_path / "q").exists()


def test_capability_gate():
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(8, 0)), \
         mock.patch.object(torch.cuda, "get_device_name", return_value="NVIDIA A100"):
        with pytest.raises(ValueError, match=r"compute capability 8.9 or newer .* NVIDIA A100 is 8.0"):
            fp8.check_fp8_device(torch.device("cuda:0"))
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        fp8.check_fp8_device(torch.device("cuda:0"))
    with pytest.raises(ValueError, match="quantize='fp8': runs on CUDA GPUs .* the model is on meta"):
        fp8.check_fp8_device(torch.device("meta"))
    fp8.check_fp8_device(torch.device("cpu"))


@pytest.mark.slow
def test_dit_xl_numerics_per_timestep():
    """DiT-XL/2, perturbed weights, t = 0, 250, 500, 999 (docs/performance.md's table: python -m
    fastdit.bench.fp8_numerics, seed 0). Measured 7.2e-2 to 1.1e-1 against either; bf16's own is 1.8e-2 to 2.7e-2."""
    for row in fp8_errors():
        assert row["fp8_vs_bf16"] < 0.15 and row["fp8_vs_reference"] < 0.15, row
        assert row["bf16_vs_reference"] < 0.03, row


def test_attention_backends_take_a_quantized_model():
    """Attention stays bf16: each backend gets the q, k, v it gets from a bf16 model (CPU backends here)."""
    _, fast = models()
    quantized = fast.quantize("fp8")
    with torch.no_grad():
        outputs = {backend: quantized.set_attn_backend(backend)(*inputs()) for backend in ("sdpa", "math")}
    assert_parity(outputs["math"], outputs["sdpa"].float(), 2e-2, "math vs sdpa attention")

"""Parity at the real sizes of DiT, on a CUDA GPU with the compiled kernels (skipped without one).
The smaller tests (tests/kernels, tests/models/test_dit*.py, tests/models/test_block_designs.py) run on the GPU too."""
import pytest
import torch
from fastdit.kernels.attention import attention, attention_reference
from fastdit.kernels.gated_residual import (
    gated_residual_modulate_layernorm,
    gated_residual_modulate_layernorm_reference,
)
from fastdit.kernels.modulate import modulate_layernorm, modulate_layernorm_reference
from fastdit.kernels.patch_embed import patch_embed, patch_embed_reference
from parity import (
    DTYPES,
    KERNEL_TOLERANCE,
    MODEL_TOLERANCE,
    assert_checkpointing_changes_no_gradient,
    assert_gradients_match,
    assert_parity,
    build_pair,
    inputs,
    launches_kernels,
    perturb_,
    requires_cuda,
)

import fastdit
from fastdit import reference

# conftest.py turns TF32 off, so the fp32 oracles are fp32, and fails a test that launched no kernel.
pytestmark = [requires_cuda, launches_kernels]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [256, 1000, 1024, 4096])
@pytest.mark.parametrize("heads, head_dim", [(16, 72), (12, 64), (6, 64)])
def test_attention_at_dit_sizes(tokens, heads, head_dim, dtype):
    qkv = torch.randn(2, tokens, 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(2)
    expected = attention_reference(q.float(), k.float(), v.float())
    assert_parity(attention(q, k, v), expected, KERNEL_TOLERANCE[dtype], "attention")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [384, 768, 1024, 1152])
def test_norm_kernels_at_dit_sizes(hidden, dtype):
    x, y = (torch.randn(8, 257, hidden, device="cuda", dtype=dtype) for _ in range(2))
    modulation = torch.randn(8, 6 * hidden, device="cuda", dtype=dtype)
    shift, scale, gate = modulation.chunk(6, dim=1)[:3]
    assert_parity(
        modulate_layernorm(x, shift, scale),
        modulate_layernorm_reference(x.float(), shift.float(), scale.float()),
        KERNEL_TOLERANCE[dtype],
    )
    residual, normed = gated_residual_modulate_layernorm(x, gate, y, shift, scale)
    expected_residual, expected_normed = gated_residual_modulate_layernorm_reference(x, gate, y, shift, scale)
    assert_parity(residual, expected_residual, KERNEL_TOLERANCE[dtype], "residual")
    assert_parity(normed, expected_normed, KERNEL_TOLERANCE[dtype], "normed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("patch, size", [(2, 32), (4, 32), (8, 32), (2, 64)])
def test_patch_embed_at_dit_sizes(patch, size, dtype):
    x = torch.randn(4, 4, size, size, device="cuda", dtype=dtype)
    weight = torch.randn(1152, 4, patch, patch, device="cuda", dtype=dtype) * 0.1
    bias = torch.randn(1152, device="cuda", dtype=dtype)
    pos = torch.randn(1, (size // patch) ** 2, 1152, device="cuda", dtype=dtype)
    expected = patch_embed_reference(x.float(), weight.float(), bias.float(), pos.float())
    assert_parity(patch_embed(x, weight, bias, pos), expected, KERNEL_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, latent", [("DiT-XL/2", 32), ("DiT-B/4", 32), ("DiT-S/2", 64)])
def test_model_at_dit_sizes(name, latent, dtype):
    ref = perturb_(reference.DiT_models[name](input_size=latent)).cuda().eval()
    ref.load_state_dict({key: value.to(dtype).float() for key, value in ref.state_dict().items()})
    fast = fastdit.DiT_models[name](input_size=latent).cuda().eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    fast.to(dtype)
    x = torch.randn(4, 4, latent, latent, device="cuda")
    t = torch.tensor([0, 250, 500, 999], device="cuda")
    y = torch.tensor([1, 207, 1000, 999], device="cuda")
    with torch.no_grad():
        expected = ref.forward_with_cfg(x, t, y, 4.0)
        actual = fast.forward_with_cfg(x.to(dtype), t, y, 4.0)
    assert_parity(actual, expected, MODEL_TOLERANCE[dtype], f"{name} {dtype} ({fast.attn_backend})")


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-XL/2"])
def test_autocast_gradients_at_dit_sizes(name):
    """A bf16-autocast training step at 256 tokens: every parameter's gradient and the input's."""
    ref, fast = build_pair(name, input_size=32)
    assert_gradients_match(ref, fast, True, name)


def test_gradient_checkpointing_at_dit_sizes():
    _, fast = build_pair("DiT-XL/2", input_size=32)
    assert_checkpointing_changes_no_gradient(fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_model_at_dit_sizes(dtype):
    _, fast = build_pair("DiT-XL/2", input_size=32)
    fast.to(dtype)
    x, t, y = inputs(fast, batch=4, dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad():
        eager, traced = fast(x, t, y), compiled(x, t, y)
    assert_parity(traced, eager, MODEL_TOLERANCE[dtype], f"compiled DiT-XL/2 {dtype}")

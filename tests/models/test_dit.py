"""The fast model against the reference: parity, state-dict compatibility, torch.compile. Both
models run on parity.DEVICE: the compiled kernels on a GPU, interpreted ones on the CPU."""

import pytest
import torch
from fastdit.kernels import kernel_path
from parity import (
    DEVICE,
    MODEL_TOLERANCE,
    assert_fails_with_wrong_kernels,
    assert_half_precision_parity,
    assert_parity,
    build_pair,
    inputs,
    launches_kernels,
    requires_triton,
)

import fastdit
from fastdit import reference

PATH = kernel_path(DEVICE)


# Every family and patch size at 16 tokens (the fast path's kernels, interpreted on CPU). forward_with_cfg
# launches the same kernels on the same shapes: it is checked once below, and per block design in
# test_block_designs.py.
@launches_kernels
@pytest.mark.parametrize("name", list(fastdit.DiT_models))
def test_forward_parity_fp32(name):
    patch = int(name[-1])
    ref, fast = build_pair(name, input_size=4 * patch)
    x, t, y = inputs(ref)
    with torch.no_grad():
        expected, actual = ref(x, t, y), fast(x, t, y)
    assert_parity(actual, expected, MODEL_TOLERANCE[torch.float32], f"{name} forward")


@launches_kernels
def test_forward_with_cfg_parity_fp32():
    ref, fast = build_pair("DiT-S/2", input_size=8)
    x, t, y = inputs(ref, batch=4)
    with torch.no_grad():
        expected, actual = ref.forward_with_cfg(x, t, y, 4.0), fast.forward_with_cfg(x, t, y, 4.0)
    assert_parity(actual, expected, MODEL_TOLERANCE[torch.float32], "DiT-S/2 forward_with_cfg")


@launches_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-XL/8"])
def test_forward_parity_half(name, dtype):
    ref, fast = build_pair(name, input_size=4 * int(name[-1]))
    assert_half_precision_parity(ref, fast, dtype, name)


@launches_kernels  # the fused norms and residuals
@requires_triton
def test_a_wrong_kernel_fails_the_parity_test():
    """Kernels that write every output 10% off fail the whole-model parity test (the half-precision
    and gradient checks, in tests/models/test_block_designs.py at smaller sizes)."""
    assert_fails_with_wrong_kernels(test_forward_parity_fp32, "DiT-S/8")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_torch_attention_backends(backend):
    ref, fast = build_pair("DiT-S/4", input_size=16, attn_backend=backend)
    x, t, y = inputs(ref)
    with torch.no_grad():
        assert_parity(fast(x, t, y), ref(x, t, y), MODEL_TOLERANCE[torch.float32], backend)


@launches_kernels
def test_non_square_token_count_and_odd_batch():
    """A latent grid whose token count is no multiple of any block size (5x5 = 25 tokens)."""
    ref, fast = build_pair("DiT-S/2", input_size=10)
    x, t, y = inputs(ref, batch=3)
    with torch.no_grad():
        assert_parity(fast(x, t, y), ref(x, t, y), MODEL_TOLERANCE[torch.float32])


@launches_kernels
def test_non_contiguous_input():
    ref, fast = build_pair("DiT-S/4", input_size=16)
    x, t, y = inputs(ref)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    with torch.no_grad():
        assert_parity(fast(x, t, y), ref(x, t, y), MODEL_TOLERANCE[torch.float32])


def test_state_dict_round_trip_both_ways():
    ref, fast = build_pair("DiT-S/8", input_size=16)
    assert list(ref.state_dict()) == list(fast.state_dict())
    back = reference.DiT_models["DiT-S/8"](input_size=16, num_classes=10)
    back.load_state_dict(fast.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value.cpu()), key


def test_parameter_counts_equal_reference():
    for name in fastdit.DiT_models:
        with torch.device("meta"):
            fast, ref = fastdit.DiT_models[name](), reference.DiT_models[name]()
        assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in ref.parameters()), name
    with torch.device("meta"):
        assert sum(p.numel() for p in fastdit.DiT_models["DiT-XL/2"]().parameters()) == 675_129_632


def test_same_init_as_reference():
    torch.manual_seed(3)
    ref = reference.DiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    torch.manual_seed(3)
    fast = fastdit.DiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    for key, value in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key


@launches_kernels
def test_compile_fullgraph_equals_eager():
    ref, fast = build_pair("DiT-S/8", input_size=16)
    x, t, y = inputs(ref)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="inductor" if PATH != "torch" else "eager")
    with torch.no_grad():
        eager, traced = fast(x, t, y), compiled(x, t, y)
    assert_parity(traced, eager, MODEL_TOLERANCE[torch.float32], "compiled")
    explanation = torch._dynamo.explain(fast)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@launches_kernels
def test_class_dropout_in_training_mode_uses_null_class():
    ref, fast = build_pair("DiT-S/8", input_size=16)
    x, t, y = inputs(ref)
    fast.y_embedder.dropout_prob = 1.0  # every label dropped (the constructor takes [0, 1): a model that never sees a class)
    fast.train()
    with torch.no_grad():
        dropped = fast(x, t, y)
        fast.eval()
        null = fast(x, t, torch.full_like(y, 10))
    assert_parity(dropped, null, 1e-6)

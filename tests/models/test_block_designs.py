"""The paper's four block designs (adaLN-Zero, adaLN, cross-attention, in-context): the fast
model against the reference for each, forward and backward, and through checkpoints."""

import pytest
import torch
from fastdit.kernels import kernel_path
from parity import (
    DEVICE,
    MODEL_TOLERANCE,
    assert_checkpointing_changes_no_gradient,
    assert_fails_with_wrong_kernels,
    assert_gradients_match,
    assert_half_precision_parity,
    assert_parity,
    build_pair,
    inputs,
    launches_kernels,
    requires_triton,
)

import fastdit
from fastdit import reference
from fastdit.models import checkpoint

DESIGNS = reference.BLOCK_DESIGNS
OTHER_DESIGNS = [design for design in DESIGNS if design != "adaln-zero"]  # adaLN-Zero: tests/models/test_dit*.py
# Small models keep the interpreted kernels quick (tests/models/test_dit.py runs the paper's widths).
SMALL = dict(patch_size=4, hidden_size=96, depth=2, num_heads=4)


def small_pair(block, input_size=16):
    return build_pair(None, input_size=input_size, block=block, **SMALL)


@launches_kernels
@pytest.mark.parametrize("block", OTHER_DESIGNS)
@pytest.mark.parametrize("hidden_size, num_heads", [(96, 4), (144, 2)])  # head sizes 24 and DiT-XL's 72
def test_forward_parity_fp32(block, hidden_size, num_heads):
    ref, fast = build_pair(None, input_size=16, block=block, **{**SMALL, "hidden_size": hidden_size,
                                                                  "num_heads": num_heads})
    x, t, y = inputs(ref)
    with torch.no_grad():
        assert_parity(fast(x, t, y), ref(x, t, y), MODEL_TOLERANCE[torch.float32], f"{block} forward")
        assert_parity(fast.forward_with_cfg(x, t, y, 4.0), ref.forward_with_cfg(x, t, y, 4.0),
                      MODEL_TOLERANCE[torch.float32], f"{block} forward_with_cfg")


@launches_kernels
@pytest.mark.parametrize("block", OTHER_DESIGNS)
def test_odd_batch_token_count_and_non_contiguous_input(block):
    """25 image tokens (27 with in-context's two), a batch of 3, a transposed-layout input."""
    ref, fast = small_pair(block, input_size=20)
    x, t, y = inputs(ref, batch=3)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)
    with torch.no_grad():
        assert_parity(fast(x, t, y), ref(x, t, y), MODEL_TOLERANCE[torch.float32], block)


@launches_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", OTHER_DESIGNS)
def test_forward_parity_half(block, dtype):
    ref, fast = small_pair(block)
    assert_half_precision_parity(ref, fast, dtype, block)


@launches_kernels
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("block", OTHER_DESIGNS)
def test_gradients_match_reference(block, autocast):
    ref, fast = small_pair(block)
    assert_gradients_match(ref, fast, autocast, block)


@launches_kernels
def test_gradient_checkpointing_gives_the_same_gradients():
    """Cross-attention's branch closes over the conditioning tokens: recomputed in backward."""
    _, fast = small_pair("cross-attn")
    assert_checkpointing_changes_no_gradient(fast)


@requires_triton
@pytest.mark.parametrize("block", OTHER_DESIGNS)
def test_a_wrong_kernel_fails_the_parity_tests(block):
    """Kernels that write every output 10% off fail each design's forward parity test."""
    assert_fails_with_wrong_kernels(test_forward_parity_fp32, block, 96, 4)


@requires_triton
def test_a_wrong_kernel_fails_the_half_precision_and_gradient_tests():
    assert_fails_with_wrong_kernels(test_forward_parity_half, "adaln", torch.bfloat16)
    assert_fails_with_wrong_kernels(test_gradients_match_reference, "adaln", True)


def test_designs_differ_as_the_paper_describes():
    """adaLN regresses 4 vectors per block (no gates), adaLN-Zero 6; the token designs have
    affine norms and no modulation; cross-attention adds one attention layer per block."""
    built = {}
    for block in DESIGNS:
        with torch.device("meta"):
            built[block] = fastdit.DiT_models["DiT-S/2"](block=block)
    hidden = 384
    assert built["adaln-zero"].blocks[0].adaLN_modulation[1].out_features == 6 * hidden
    assert built["adaln"].blocks[0].adaLN_modulation[1].out_features == 4 * hidden
    for block in ("cross-attn", "in-context"):
        assert not any("adaLN" in key for key in built[block].state_dict()), block
    assert hasattr(built["cross-attn"].blocks[0], "cross_attn")
    counts = {block: sum(p.numel() for p in model.parameters()) for block, model in built.items()}
    assert counts["in-context"] < counts["cross-attn"] < counts["adaln"] < counts["adaln-zero"]


def test_zero_initialisation():
    """adaLN-Zero starts every block as the identity; all designs start with a zero output
    (the final projection is zero), and no other design's block is the identity."""
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])
    for block in DESIGNS:
        model = reference.DiT(input_size=16, patch_size=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                              block=block).eval()
        tokens = model.x_embedder(x) + model.pos_embed
        c = model.condition(t, y)
        if block == "in-context":
            tokens = torch.cat([c, tokens], dim=1)
        with torch.no_grad():
            assert torch.equal(model(x, t, y), torch.zeros(2, 8, 16, 16)), block
            identity = torch.equal(model.blocks[0](tokens, c), tokens)
        assert identity == (block == "adaln-zero"), block


@launches_kernels
@pytest.mark.parametrize("block", DESIGNS)
def test_checkpoint_round_trip_and_inferred_design(block, tmp_path):
    ref, fast = small_pair(block)
    fast.save_pretrained(tmp_path / "model")
    loaded = fastdit.load(tmp_path / "model", device=DEVICE, attn_backend=fast.attn_backend)
    assert loaded.block == block
    inferred = checkpoint.infer_config(ref.state_dict(), {"num_heads": SMALL["num_heads"]})
    assert inferred["block"] == block  # a bare state dict says its design too
    x, t, y = inputs(ref)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), fast(x, t, y))


def test_unknown_design_is_a_clear_error():
    with pytest.raises(ValueError, match=r"block: expected one of 'adaln-zero', .* got 'adaln-zeros'"):
        fastdit.DiT(input_size=8, hidden_size=64, depth=1, num_heads=4, block="adaln-zeros")


@launches_kernels
@pytest.mark.parametrize("block", ["cross-attn", "in-context"])
def test_compile_fullgraph_equals_eager(block):
    ref, fast = small_pair(block)
    x, t, y = inputs(ref)
    torch._dynamo.reset()
    backend = "inductor" if kernel_path(DEVICE) != "torch" else "eager"
    compiled = torch.compile(fast, fullgraph=True, backend=backend)
    with torch.no_grad():
        assert_parity(compiled(x, t, y), fast(x, t, y), MODEL_TOLERANCE[torch.float32], f"{block} compiled")

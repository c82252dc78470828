"""The analytic FLOP count of fastdit.models.flops against torch.utils.flop_counter and the paper."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastdit
from fastdit import reference
from fastdit.models.flops import (
    TRAINING_FORWARDS,
    DiTShape,
    attention_macs,
    forward_attention_products,
    forward_flops,
    forward_linears,
    forward_macs,
    forward_macs_by_op,
    forward_macs_by_part,
    named_shape,
    shape_of,
    workload_flops,
)


def counted_macs_per_image(model, batch=2):
    """MACs of a forward as torch's flop counter sees them (it counts 2 FLOPs per MAC), per image.
    On the meta device: nothing is computed, so DiT-XL/2 at 512 px costs nothing."""
    with torch.device("meta"):
        x = torch.randn(batch, model.in_channels, model.input_size, model.input_size)
        t, y = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    total = counter.get_total_flops()
    assert total % (2 * batch) == 0
    return total // (2 * batch)


@pytest.mark.parametrize("name, input_size, kwargs", [
    ("DiT-XL/2", 32, {}),
    ("DiT-XL/2", 64, {}),
    ("DiT-L/4", 32, {}),
    ("DiT-B/8", 16, {}),
    ("DiT-S/2", 8, {"learn_sigma": False}),
    ("DiT-S/4", 12, {"in_channels": 3, "num_classes": 10}),
])
def test_analytic_count_equals_torch_flop_counter(name, input_size, kwargs):
    with torch.device("meta"):
        model = reference.DiT_models[name](input_size=input_size, **kwargs).eval()
    shape = named_shape(name, input_size, in_channels=kwargs.get("in_channels", 4),
                        learn_sigma=kwargs.get("learn_sigma", True))
    assert shape_of(model) == shape
    assert forward_macs(shape) == counted_macs_per_image(model)


@pytest.mark.parametrize("name, input_size, gflops", [
    ("DiT-S/2", 32, 6.06), ("DiT-B/2", 32, 23.01), ("DiT-L/2", 32, 80.71), ("DiT-XL/2", 32, 118.6),
    ("DiT-XL/2", 64, 524.6),
])
def test_paper_gflops(name, input_size, gflops):
    """Peebles & Xie, Table 4 and section 5 ("Gflops" are MACs, as their counter, fvcore, counts)."""
    assert forward_macs(named_shape(name, input_size)) / 1e9 == pytest.approx(gflops, rel=1e-3)


@pytest.mark.parametrize("block", reference.BLOCK_DESIGNS)
def test_block_designs_equal_torch_flop_counter(block):
    with torch.device("meta"):
        model = reference.DiT_models["DiT-S/4"](input_size=16, block=block).eval()
    shape = named_shape("DiT-S/4", 16, block=block)
    assert shape_of(model) == shape
    assert forward_macs(shape) == counted_macs_per_image(model)


def test_block_design_costs_as_the_paper_reports():
    """Section 3.2: in-context and adaLN add next to nothing; cross-attention about 15%."""
    macs = {block: forward_macs(named_shape("DiT-XL/2", 32, block=block)) for block in reference.BLOCK_DESIGNS}
    for block in ("adaln", "in-context"):
        assert macs[block] / macs["adaln-zero"] == pytest.approx(1, abs=0.02), block
    assert macs["cross-attn"] / macs["adaln-zero"] == pytest.approx(1.15, abs=0.02)


def test_dit_xl_2_at_256_px_is_118_6_gmacs():
    assert round(forward_macs(named_shape("DiT-XL/2", 32)) / 1e9, 1) == 118.6


def test_parts_and_workloads():
    shape = named_shape("DiT-XL/2", 32)
    parts = forward_macs_by_part(shape)
    assert sum(parts.values()) == forward_macs(shape)
    assert parts["attention_scores"] == 28 * attention_macs(256, 1152) == 28 * 2 * 256 * 256 * 1152
    assert parts["mlp"] > parts["attention_projections"] > parts["attention_scores"]  # 8 : 4 : 2T/d of d^2 per token
    assert forward_flops(shape) == 2 * forward_macs(shape)
    assert workload_flops(shape, "forward") == forward_flops(shape)
    assert workload_flops(shape, "sampling-step") == 2 * forward_flops(shape)  # conditional + unconditional
    assert workload_flops(shape, "training-step") == TRAINING_FORWARDS * forward_flops(shape)


def test_shape_of_fast_model_and_custom_mlp_ratio():
    with torch.device("meta"):
        fast = fastdit.DiT_models["DiT-B/4"](input_size=16)
        wide = fastdit.DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0)
    assert shape_of(fast) == named_shape("DiT-B/4", 16)
    assert shape_of(wide) == DiTShape(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                                      mlp_hidden_size=128)
    with torch.device("meta"):
        wide_reference = reference.DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0)
    assert forward_macs(shape_of(wide)) == counted_macs_per_image(wide_reference.eval())


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown model 'DiT-M/2'; valid names: DiT-S/2"):
        named_shape("DiT-M/2", 32)
    with pytest.raises(ValueError, match="input_size: expected a positive multiple of the patch size 8.*got 12"):
        named_shape("DiT-S/8", 12)
    with pytest.raises(ValueError, match="input_size.*got 32.0"):
        named_shape("DiT-S/2", 32.0)
    with pytest.raises(ValueError, match="workload: expected one of forward, sampling-step, training-step, sampling-run, got 'x'"):
        workload_flops(named_shape("DiT-S/2", 32), "x")


@pytest.mark.parametrize("block", reference.BLOCK_DESIGNS)
@pytest.mark.parametrize("name, input_size", [("DiT-XL/2", 32), ("DiT-XL/2", 64), ("DiT-S/4", 16)])
def test_per_op_counts_add_up_to_the_parts(name, input_size, block):
    shape = named_shape(name, input_size, block=block)
    ops = [*forward_linears(shape), *forward_attention_products(shape)]
    by_part = {}
    for op in ops:
        by_part[op.part] = by_part.get(op.part, 0) + op.macs
    assert by_part == forward_macs_by_part(shape)
    assert sum(forward_macs_by_op(shape).values()) == forward_macs(shape)
    assert len(forward_macs_by_op(shape)) == len(ops)  # no two ops share a name


def test_per_op_linears_are_the_models_layers():
    """Each counted linear layer has the in/out features of a layer of the reference model."""
    with torch.device("meta"):
        model = reference.DiT_models["DiT-S/2"](input_size=8)
    shapes = {(module.in_features, module.out_features) for module in model.modules()
              if isinstance(module, torch.nn.Linear)}
    shapes.add((model.x_embedder.proj.in_channels * 4, model.x_embedder.proj.out_channels))
    linears = forward_linears(shape_of(model))
    assert {(linear.in_features, linear.out_features) for linear in linears} == shapes
    assert sum(linear.count for linear in linears) == sum(
        isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) for module in model.modules())

"""One adaLN GEMM for every block (fastdit.models.modulation) and the MLP's fused GELU: same keys, same
function, fewer launches."""
import collections
import copy

import pytest
import torch
from parity import assert_parity, perturb_
from torch.utils._python_dispatch import TorchDispatchMode

import fastdit
from fastdit import reference
from fastdit.kernels import linear_gelu
from fastdit.models import modulation

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def models(block="adaln-zero"):
    ref = perturb_(reference.DiT(**TINY, block=block)).eval()
    fast = fastdit.DiT(**TINY, block=block).eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([0, 999]), torch.tensor([1, 10])


def gemms(model, *args):
    with torch.no_grad(), CountOps() as counter:
        model(*args)
    return counter.counts["aten.addmm"] + counter.counts["aten.mm"] + counter.counts["aten._addmm_activation"]


@pytest.mark.parametrize("block", ["adaln-zero", "adaln"])
def test_state_dict_is_the_release_s(block):
    ref, fast = models(block)
    expected, actual = ref.state_dict(), fast.state_dict()
    assert list(actual) == list(expected)  # the same keys, in the same order
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert not any(key.startswith("modulation_") for key in actual)


def test_one_gemm_for_every_modulation(monkeypatch):
    ref, fast = models()
    monkeypatch.setattr(linear_gelu, "FUSED", False)
    counts = {}
    for one_gemm in (True, False):
        monkeypatch.setattr(modulation, "ONE_GEMM", one_gemm)
        with torch.no_grad():
            assert_parity(fast(*inputs()), ref(*inputs()), 1e-5, f"ONE_GEMM={one_gemm}")
        counts[one_gemm] = gemms(fast, *inputs())
    # depth + 1 adaLN GEMMs (the blocks' and the final layer's) become one
    assert counts[False] - counts[True] == TINY["depth"]


def test_views_follow_copies_casts_and_updates():
    _, fast = models()
    ema = copy.deepcopy(fast)
    rows = ema.blocks[1].adaLN_modulation[1]
    assert rows.model is ema and rows.weight.data_ptr() == ema.modulation_weight[rows.start:].data_ptr()
    half = copy.deepcopy(fast).to(torch.bfloat16)
    assert half.final_layer.adaLN_modulation[1].weight.dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(fast.parameters(), lr=0.1)
    fast.train()
    before = fast.blocks[2].adaLN_modulation[1].weight.clone()
    fast(*inputs()).square().mean().backward()
    optimizer.step()
    assert not torch.equal(fast.blocks[2].adaLN_modulation[1].weight, before)
    assert fast.blocks[2].adaLN_modulation[1].weight.grad_fn is not None  # a view of the trained parameter


def test_release_key_errors_name_the_release_key():
    ref, fast = models()
    state = ref.state_dict()
    del state["blocks.1.adaLN_modulation.1.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "blocks.1.adaLN_modulation.1.bias"\.'):
        fast.load_state_dict(state)
    assert fast.load_state_dict(state, strict=False).missing_keys == ["blocks.1.adaLN_modulation.1.bias"]
    state = ref.state_dict()
    state["final_layer.adaLN_modulation.1.weight"] = torch.zeros(3, 32)
    with pytest.raises(RuntimeError, match="size mismatch for final_layer.adaLN_modulation.1.weight"):
        fast.load_state_dict(state)


def test_save_and_load_round_trip(tmp_path):
    ref, fast = models()
    fast.save_pretrained(tmp_path / "model")
    loaded = fastdit.load(tmp_path / "model")
    for key, value in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "in-context"])
def test_release_parameter_names_are_the_reference_models(block):
    ref, fast = models(block)
    assert modulation.release_parameter_names(fast) == [name for name, _ in ref.named_parameters()]


def adam_step(model, optimizer):
    model(*inputs()).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_an_optimizer_state_of_the_release_s_parameters_is_the_stacked_models():
    """AdamW's state after a step of the reference (each adaLN layer a parameter of its own), joined, is the
    state of the same step of the fast model; joined again it is unchanged, and it loads."""
    ref, fast = models()
    per_layer, stacked = (torch.optim.AdamW(model.parameters(), lr=1e-3) for model in (ref, fast))
    adam_step(ref, per_layer)
    adam_step(fast, stacked)
    joined = modulation.stacked_optimizer_state(fast, per_layer.state_dict())
    expected = stacked.state_dict()
    assert joined["param_groups"] == expected["param_groups"] and joined["state"].keys() == expected["state"].keys()
    for index, adam in expected["state"].items():
        for key, value in adam.items():
            assert_parity(joined["state"][index][key], value, 1e-5, f"state {index}.{key}")
    assert modulation.stacked_optimizer_state(fast, expected) is expected
    torch.optim.AdamW(fast.parameters(), lr=1e-3).load_state_dict(joined)
    del expected["param_groups"][0]["params"][0]
    with pytest.raises(ValueError, match=r"^the optimizer state holds 35 parameters, the model has 36 \(42 with "
                                         r"each adaLN layer's weight and bias its own\)$"):
        modulation.stacked_optimizer_state(fast, expected)


def test_fused_gelu_in_inference_only(monkeypatch):
    """The MLP runs fastdit::linear_gelu where nothing records a backward, and the reference's ops where autograd does."""
    ref, fast = models()
    calls = collections.Counter()
    original = linear_gelu.linear_gelu
    monkeypatch.setattr(linear_gelu, "linear_gelu", lambda *args: calls.update(["fused"]) or original(*args))
    with torch.no_grad():
        assert_parity(fast(*inputs()), ref(*inputs()), 1e-5)
    assert calls["fused"] == TINY["depth"]
    fast(*inputs())
    assert calls["fused"] == TINY["depth"]
    monkeypatch.setattr(linear_gelu, "FUSED", False)
    with torch.no_grad():
        fast(*inputs())
    assert calls["fused"] == TINY["depth"]

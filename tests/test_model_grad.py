"""Gradients of the fast model equal the reference's, for every parameter and the input."""
import pytest
import torch

import fastdit
from fastdit import reference
from parity import assert_parity, perturb_

GRAD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def pair(name, input_size, **kwargs):
    ref = perturb_(reference.DiT_models[name](input_size=input_size, num_classes=10, **kwargs))
    fast = fastdit.DiT_models[name](input_size=input_size, num_classes=10, attn_backend="triton", **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref.eval(), fast.eval()


def loss_and_grads(model, x, t, y, autocast):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    # A fixed random projection of the output: every output element gets its own gradient.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out.float() * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return grads, x.grad


@pytest.mark.parametrize("name, autocast", [("DiT-S/2", False), ("DiT-B/4", False), ("DiT-S/4", True)])
def test_gradients_match_reference(name, autocast):
    ref, fast = pair(name, input_size=4 * int(name[-1]))
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, ref.input_size, ref.input_size, generator=generator)
    t, y = torch.tensor([10, 900]), torch.tensor([3, 10])
    expected, expected_x = loss_and_grads(ref, x, t, y, autocast)
    actual, actual_x = loss_and_grads(fast, x, t, y, autocast)
    tolerance = GRAD_TOLERANCE[torch.bfloat16 if autocast else torch.float32]
    assert expected.keys() == actual.keys()
    for key in expected:
        assert_parity(actual[key], expected[key], tolerance, key)
    assert_parity(actual_x, expected_x, tolerance, "x")


def test_gradient_checkpointing_gives_the_same_gradients():
    _, fast = pair("DiT-S/8", input_size=16)
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([10, 900]), torch.tensor([3, 10])
    plain, plain_x = loss_and_grads(fast, x, t, y, False)
    fast.zero_grad()
    fast.gradient_checkpointing = True
    checkpointed, checkpointed_x = loss_and_grads(fast, x, t, y, False)
    for key in plain:
        assert torch.equal(plain[key], checkpointed[key]), key
    assert torch.equal(plain_x, checkpointed_x)

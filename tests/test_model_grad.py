"""Gradients of the fast model equal the reference's, for every parameter and the input."""
import pytest
import torch

from parity import GRAD_TOLERANCE, assert_parity, build_pair, loss_and_grads


@pytest.mark.parametrize("name, autocast", [("DiT-S/2", False), ("DiT-B/4", False), ("DiT-S/4", True)])
def test_gradients_match_reference(name, autocast):
    ref, fast = build_pair(name, input_size=4 * int(name[-1]))
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
    _, fast = build_pair("DiT-S/8", input_size=16)
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([10, 900]), torch.tensor([3, 10])
    plain, plain_x = loss_and_grads(fast, x, t, y, False)
    fast.zero_grad()
    fast.gradient_checkpointing = True
    checkpointed, checkpointed_x = loss_and_grads(fast, x, t, y, False)
    for key in plain:
        assert torch.equal(plain[key], checkpointed[key]), key
    assert torch.equal(plain_x, checkpointed_x)

"""Gradients of the fast model equal the reference's, for every parameter and the input, on
parity.DEVICE (on a GPU: bf16 autocast and checkpointing through the compiled kernels)."""
import pytest
from parity import assert_checkpointing_changes_no_gradient, assert_gradients_match, build_pair, launches_kernels


@launches_kernels
@pytest.mark.parametrize("name, autocast", [("DiT-S/2", False), ("DiT-B/4", False), ("DiT-S/4", True)])
def test_gradients_match_reference(name, autocast):
    ref, fast = build_pair(name, input_size=4 * int(name[-1]))
    assert_gradients_match(ref, fast, autocast, name)


@launches_kernels
def test_gradient_checkpointing_gives_the_same_gradients():
    _, fast = build_pair("DiT-S/8", input_size=16)
    assert_checkpointing_changes_no_gradient(fast)

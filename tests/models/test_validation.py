"""Label checks: clear errors on the CPU, and no host sync on a device (the meta device stands in for a GPU)."""
import pytest
import torch

import fastdit
from fastdit.models.validation import check_label_range_async, check_labels, check_model_inputs


@pytest.fixture
def no_host_reads(monkeypatch):
    """Make reading a tensor's values on the host (a device sync on a GPU) an error."""
    def read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    for method in ("tolist", "item", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, read)


def test_checking_a_forwards_inputs_on_a_device_reads_nothing_back(no_host_reads, monkeypatch):
    """What ``fastdit.DiT.forward`` checks in every call (so every sampling and training step)."""
    checked = []
    monkeypatch.setattr(torch, "_assert_async", lambda condition, message: checked.append(message))
    with torch.device("meta"):
        model = fastdit.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 10])
    check_model_inputs(model, x, t, y)
    assert checked == ["y: class labels must lie in [0, 10] (index 10 is the null class)"]


@pytest.mark.parametrize("labels, allow_null, bad", [([0, 11], True, True), ([-1, 3], True, True),
                                                     ([0, 10], False, True), ([0, 10], True, False)])
def test_the_device_check_fails_exactly_on_labels_out_of_range(labels, allow_null, bad):
    """The condition the device asserts, evaluated on the CPU, where ``torch._assert_async`` raises its message."""
    high = 10 if allow_null else 9
    check = lambda: check_label_range_async(torch.tensor(labels), high, "y: out of range")  # noqa: E731
    if bad:
        with pytest.raises(RuntimeError, match="y: out of range"):
            check()
    else:
        check()


def test_cpu_labels_get_the_clear_error():
    with pytest.raises(ValueError, match=r"^labels: class labels must lie in \[0, 9\], got 12$"):
        check_labels(torch.tensor([3, 12]), 10, allow_null=False, name="labels")

"""The checks that keep the kernel tests honest: conftest.py fails a kernel test that launched no
Triton kernel, and parity.wrong_kernels makes every kernel wrong so that the parity tests can be
shown to fail (each kernel's test file does so for its op)."""
import pathlib

import pytest
import torch
from parity import DEVICE, WRONG_KERNEL_GAIN, intercepted_launches, launches_kernels, requires_triton, wrong_kernels

from fastdit.kernels import runtime
from fastdit.kernels.modulate import modulate_layernorm


class KernelTest:
    """What conftest.py's hook reads of a collected test: its id and marks."""

    def __init__(self, *marks):
        self.nodeid = "tests/kernels/test_x.py::test_x"
        self.marks = [decorator.mark for decorator in marks]

    def iter_markers(self):
        return iter(self.marks)


def run_under_hook(config, test, body):
    """``body()`` run as pytest runs the test ``test``: through tests/conftest.py's pytest_runtest_call."""
    conftest, = (plugin for plugin in config.pluginmanager.get_plugins()
                 if getattr(plugin, "__file__", "") == str(pathlib.Path(__file__).parents[1] / "conftest.py"))
    call = conftest.pytest_runtest_call(test)
    next(call)
    body()
    with pytest.raises(StopIteration):
        call.send(None)


def normalise():
    x, shift = torch.randn(1, 3, 16, device=DEVICE), torch.randn(1, 16, device=DEVICE)
    return modulate_layernorm(x, shift, shift)


def normalise_off_the_kernel(monkeypatch):
    """The op on DEVICE taking its torch path, as it does on a GPU machine for inputs left on the CPU."""
    monkeypatch.setattr(runtime, "kernel_path", lambda device=None: "torch")
    normalise()
    monkeypatch.undo()


@requires_triton
@pytest.mark.parametrize("mark", [requires_triton, launches_kernels], ids=["requires_triton", "launches_kernels"])
def test_a_kernel_test_that_launches_no_kernel_fails(mark, monkeypatch, pytestconfig):
    run_under_hook(pytestconfig, KernelTest(mark), normalise)
    with pytest.raises(AssertionError, match=r"test_x launched no Triton kernel on the triton\S* path: .*parity.DEVICE"):
        run_under_hook(pytestconfig, KernelTest(mark), lambda: normalise_off_the_kernel(monkeypatch))
    run_under_hook(pytestconfig, KernelTest(), lambda: normalise_off_the_kernel(monkeypatch))  # not a kernel test


@requires_triton
def test_intercepted_launches_name_each_launch():
    x, shift, scale = torch.randn(2, 5, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE)
    # On a GPU with tuning on, a shape's first use launches every candidate config (kernels/tuning.py): the
    # shape is used once first, so the intercepted call is the tuned one, a single launch on any machine.
    modulate_layernorm(x, shift, scale)
    with intercepted_launches() as launches:
        modulate_layernorm(x, shift, scale)
    assert len(launches) == 1 and "modulate" in launches[0], launches


@requires_triton
def test_wrong_kernels_scale_the_outputs_and_leave_the_inputs():
    x, shift, scale = torch.randn(2, 5, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE)
    originals = [tensor.clone() for tensor in (x, shift, scale)]
    correct = modulate_layernorm(x, shift, scale)
    with wrong_kernels() as launches:
        wrong = modulate_layernorm(x, shift, scale)
    assert launches
    assert torch.equal(wrong, correct * WRONG_KERNEL_GAIN)
    assert all(torch.equal(tensor, original) for tensor, original in zip((x, shift, scale), originals))
    assert torch.equal(modulate_layernorm(x, shift, scale), correct), "the kernels stayed wrong after the block"

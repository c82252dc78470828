"""The checks that keep the kernel tests honest: conftest.py fails a kernel test that launched no
Triton kernel, and parity.wrong_kernels makes every kernel wrong so that the parity tests can be
shown to fail (each kernel's test file does so for its op)."""
import pathlib

import torch
from parity import DEVICE, WRONG_KERNEL_GAIN, intercepted_launches, requires_triton, wrong_kernels

from fastdit.kernels.modulate import modulate_layernorm

# Three tests of one op on DEVICE: on the kernel, and twice off it (as inputs left on the CPU are
# on a GPU machine), once marked as a kernel test and once not.
KERNEL_TESTS = """
import torch
from parity import DEVICE, launches_kernels, requires_triton

from fastdit.kernels import runtime
from fastdit.kernels.modulate import modulate_layernorm


def normalise():
    x, shift = torch.randn(1, 3, 16, device=DEVICE), torch.randn(1, 16, device=DEVICE)
    return modulate_layernorm(x, shift, shift)


@requires_triton
def test_on_the_kernel():
    normalise()


@launches_kernels
def test_off_the_kernel(monkeypatch):
    monkeypatch.setattr(runtime, "kernel_path", lambda device=None: "torch")
    normalise()


def test_off_the_kernel_unmarked(monkeypatch):
    monkeypatch.setattr(runtime, "kernel_path", lambda device=None: "torch")
    normalise()
"""


@requires_triton
def test_a_kernel_test_that_launches_no_kernel_fails(pytester):
    pytester.makeconftest((pathlib.Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(test_kernel_tests=KERNEL_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:xdist", "-p", "no:cacheprovider", "-o", "addopts=")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_off_the_kernel launched no Triton kernel on the triton* path*"])
    assert "test_off_the_kernel_unmarked launched" not in result.stdout.str()


@requires_triton
def test_intercepted_launches_name_each_launch():
    x, shift, scale = torch.randn(2, 5, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE)
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

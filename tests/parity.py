"""Tolerances for every parity test, in one place.

Error is measured as ``max|actual - expected| / max|expected|`` (relative max error), with
``expected`` computed by the torch reference in fp32 from the same inputs. A kernel's
output is rounded once to its dtype, so its error sits near that dtype's unit roundoff
(fp32 ~6e-8, fp16 ~5e-4, bf16 ~4e-3); the bounds leave headroom for fp32 accumulation
order but stay well under what a wrong kernel produces (tests check a deliberately wrong
variant fails). Whole-model bounds are the ones the project promises (issue 3).
"""
import contextlib
import copy

import pytest
import torch
from fastdit.kernels import kernel_path
from triton.runtime.jit import KernelInterface

import fastdit
from fastdit import reference
from fastdit.models import parity
from fastdit.models import modulation
from fastdit.models.parity import MODEL_TOLERANCE, PERTURBATION, perturb_  # noqa: F401 (the tests import them from here)

KERNEL_TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (x dtype, dtype of the other inputs): one dtype everywhere, or autocast's fp32 residual stream
# with half-precision modulation
DTYPE_PAIRS = [(dtype, dtype) for dtype in DTYPES] + [(torch.float32, torch.float16), (torch.float32, torch.bfloat16)]

# (batch, tokens, hidden_size) of the per-token ops: batch 1, token counts off any block size,
# DiT hidden sizes, and hidden sizes that are not a power of two
HIDDEN_STATE_SHAPES = [(1, 1, 384), (2, 7, 72), (3, 33, 1152), (2, 100, 200), (1, 16, 768), (2, 5, 1024)]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Kernel-vs-reference tests need the Triton path: on the torch path an op is its own reference.
requires_triton = pytest.mark.skipif(
    kernel_path(DEVICE) == "torch",
    reason="no Triton path on this device (set TRITON_INTERPRET=1): the op would run its own reference",
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# A test of the fused kernels that also runs on the torch path (gradients, whole models). Where
# DEVICE has a Triton path, conftest.py fails every test marked with this or requires_triton that
# launched no Triton kernel: one that built its inputs off DEVICE compared the reference with itself.
launches_kernels = pytest.mark.launches_kernels


# --- Triton launches ------------------------------------------------------------------------


def _tensor_arguments(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(getattr(value, "base", None), torch.Tensor):  # a TMA TensorDescriptor
            yield value.base


def _kernel_name(kernel) -> str:
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):  # autotuner, heuristics
        kernel = kernel.fn
    return getattr(kernel, "__name__", repr(kernel))


@contextlib.contextmanager
def intercepted_launches(after_launch=None):
    """Yields the list of the names of the Triton kernels launched inside, in launch order.

    Every launch (``kernel[grid](...)``, compiled or interpreted, through autotuners too) goes
    through ``KernelInterface.__getitem__``. ``after_launch(written)``, if given, runs after each
    launch with the tensor arguments the kernel changed: its outputs."""
    launches = []
    original = KernelInterface.__getitem__

    def launcher(kernel, grid):
        launch = original(kernel, grid)

        def run(*args, **kwargs):
            launches.append(_kernel_name(kernel))
            if after_launch is None:
                return launch(*args, **kwargs)
            # Once each: a launcher may pass one tensor twice (an output standing in for an unused pointer).
            tensors = list({id(tensor): tensor for tensor in _tensor_arguments(args, kwargs)}.values())
            before = [tensor.clone() for tensor in tensors]
            result = launch(*args, **kwargs)
            # Fresh output buffers may hold NaN, which torch.equal never calls equal: written.
            after_launch([tensor for tensor, old in zip(tensors, before) if not torch.equal(tensor, old)])
            return result

        return run

    KernelInterface.__getitem__ = launcher
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


# A gain error of 10%: six times bf16's kernel bound and twice its whole-model bound.
WRONG_KERNEL_GAIN = 1.1


@contextlib.contextmanager
def wrong_kernels():
    """Every Triton kernel launched inside writes its outputs scaled by WRONG_KERNEL_GAIN: the
    deliberately wrong kernel that each parity test must fail on. Yields the launches."""
    def scale_outputs(written):
        for tensor in written:
            tensor.mul_(WRONG_KERNEL_GAIN)

    with intercepted_launches(scale_outputs) as launches:
        yield launches


def assert_fails_with_wrong_kernels(test, *args, **kwargs):
    """``test(*args, **kwargs)`` fails its parity check when every kernel is wrong. Pass arguments
    of one of the test's own cases: that case shows it passes with the real kernels."""
    with wrong_kernels() as launches, pytest.raises(AssertionError, match="relative max error"):
        test(*args, **kwargs)
    assert launches, f"{test.__name__} launched no Triton kernel"


def relative_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "output has NaN or inf"
    return parity.relative_max_error(actual, expected)


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str = "output"):
    error = relative_max_error(actual, expected)
    assert error <= tolerance, f"{what}: relative max error {error:.3e} > {tolerance:.1e}"


def assert_grads_match(actual, expected, inputs, names):
    """Each grad has its input's dtype and shape and is within that dtype's tolerance of the expected one."""
    for name, grad, exact, tensor in zip(names, actual, expected, inputs):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, f"grad of {name}: {grad.dtype} {grad.shape}"
        assert_parity(grad, exact, KERNEL_TOLERANCE[grad.dtype], f"grad of {name}")



# FP8 ops (fastdit.kernels.rows.quantize_rows and the fused ops that write E4M3): each row's fp32 scale is
# its max / 448 within fp32 rounding (the kernels' LayerNorm rounds differently from torch's: measured 2e-7).
FP8_SCALE_TOLERANCE = 1e-5


def assert_quantized_rows(values, scales, expected, what="output"):
    """``(values, scales)`` quantize the fp32 rows ``expected`` (..., D) per row: each scale is the row's max over
    448 (FP8_SCALE_TOLERANCE), and each value, in units of its row's scale, is within half an E4M3 step of the fp32
    value (steps: 2^(e - 3) at magnitude [2^e, 2^(e + 1)), 2^-9 below 2^-6), plus 1e-5 of it for the kernels'
    own fp32 rounding of the row."""
    expected = expected.float()
    assert values.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32, f"{what}: {values.dtype} {scales.dtype}"
    assert values.shape == expected.shape and scales.shape == (*expected.shape[:-1], 1), \
        f"{what}: shapes {tuple(values.shape)} {tuple(scales.shape)} for rows {tuple(expected.shape)}"
    exact_scales = expected.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448
    assert_parity(scales, exact_scales, FP8_SCALE_TOLERANCE, f"{what} scales")
    exact = expected / scales
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0 ** -6))) - 3)
    excess = (values.float() - exact).abs() - (0.5 * step + 1e-5 * exact.abs())
    assert excess.max() <= 0, f"{what}: a value {excess.max():.3g} steps past half an E4M3 step from the fp32 row"


def assert_compiled_matches_eager(run, fn, names):
    """``run(fn)`` returns tensors (outputs, grads): run with ``torch.compile(fn, fullgraph=True)``
    it must return them bit for bit as with eager ``fn``, from the same seed."""
    torch.manual_seed(0)
    eager = run(fn)
    torch.manual_seed(0)
    compiled = run(torch.compile(fn, fullgraph=True))
    assert len(compiled) == len(eager) == len(names)
    for name, actual, expected in zip(names, compiled, eager):
        assert torch.equal(actual, expected), name


# --- whole models ---------------------------------------------------------------------------


def build_pair(name, input_size, attn_backend="triton", **kwargs):
    """(reference, fast) models on DEVICE with the same perturbed weights: a paper configuration
    by name, or with ``name=None`` one built from ``kwargs``."""
    ref_class, fast_class = (reference.DiT, fastdit.DiT) if name is None else (reference.DiT_models[name],
                                                                               fastdit.DiT_models[name])
    # Initialised and perturbed on the CPU: the same weights on every device.
    ref = perturb_(ref_class(input_size=input_size, num_classes=10, **kwargs)).to(DEVICE).eval()
    with torch.device("meta"):  # skip a second initialisation: the weights come from the reference
        fast = fast_class(input_size=input_size, num_classes=10, attn_backend=attn_backend, **kwargs)
    fast.load_state_dict({key: value.clone() for key, value in ref.state_dict().items()}, strict=True, assign=True)
    fast.eval()
    return ref, fast


def inputs(model, batch=2, dtype=torch.float32):
    """(x, t, y) on the model's device, the last label the null class."""
    generator = torch.Generator().manual_seed(1)
    size = model.input_size
    x = torch.randn(batch, model.in_channels, size, size, generator=generator).to(dtype)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    y[-1] = 10  # the null class
    device = next(model.parameters()).device
    return x.to(device), t.to(device), y.to(device)


# Gradients sum over the batch and tokens: looser than the forward's bounds.
GRAD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def loss_and_grads(model, x, t, y, autocast):
    """({parameter name: gradient}, gradient of x) of a fixed random projection of model(x, t, y)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    # A fixed random projection of the output: every output element gets its own gradient.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    (out.float() * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    if hasattr(model, modulation.WEIGHT):  # the fast model's stacked adaLN weights, under the release's keys
        modulation.split_into_release_keys(model, grads)
    return grads, x.grad


def assert_half_precision_parity(ref, fast, dtype, what):
    """The fast model in ``dtype`` vs the fp32 reference on the same (rounded) weights, and no
    less accurate than the reference itself run eagerly in that dtype."""
    ref.load_state_dict({key: value.to(dtype).float() for key, value in ref.state_dict().items()})
    ref_half = copy.deepcopy(ref).to(dtype)
    fast.to(dtype)
    x, t, y = inputs(ref, dtype=dtype)
    with torch.no_grad():
        expected = ref.forward_with_cfg(x.float(), t, y, 4.0)
        actual = fast.forward_with_cfg(x, t, y, 4.0)
        eager_half = ref_half.forward_with_cfg(x, t, y, 4.0)
    assert actual.dtype == dtype
    assert_parity(actual, expected, MODEL_TOLERANCE[dtype], f"{what} {dtype}")
    # The conditioning path (embedders, adaLN linears) is the same torch code in both, so
    # the fused kernels may add little: 25% over the eager error bounds that, loosely.
    assert relative_max_error(actual, expected) <= 1.25 * relative_max_error(eager_half, expected) + 1e-3


def gradient_inputs(model):
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size, generator=torch.Generator().manual_seed(2))
    device = next(model.parameters()).device
    return x.to(device), torch.tensor([10, 900], device=device), torch.tensor([3, 10], device=device)


def assert_gradients_match(ref, fast, autocast, what):
    """Every parameter's gradient and the input's, fast vs reference (bf16 autocast or fp32)."""
    x, t, y = gradient_inputs(ref)
    expected, expected_x = loss_and_grads(ref, x, t, y, autocast)
    actual, actual_x = loss_and_grads(fast, x, t, y, autocast)
    tolerance = GRAD_TOLERANCE[torch.bfloat16 if autocast else torch.float32]
    assert expected.keys() == actual.keys()
    for key in expected:
        assert_parity(actual[key], expected[key], tolerance, f"{what} {key}")
    assert_parity(actual_x, expected_x, tolerance, f"{what} x")


def assert_checkpointing_changes_no_gradient(fast):
    """Gradient checkpointing recomputes the same forward: bit-equal gradients."""
    x, t, y = gradient_inputs(fast)
    plain, plain_x = loss_and_grads(fast, x, t, y, False)
    fast.zero_grad()
    fast.gradient_checkpointing = True
    checkpointed, checkpointed_x = loss_and_grads(fast, x, t, y, False)
    for key in plain:
        assert torch.equal(plain[key], checkpointed[key]), key
    assert torch.equal(plain_x, checkpointed_x)


def save_tiny_checkpoint(path, in_channels, input_size, patch_size, num_classes=10):
    """A one-block DiT with perturbed weights (adaLN-Zero makes a fresh one output zeros), saved as the
    release saves: a plain state dict. Width 384 is DiT-S's, from which the loader reads num_heads; 4 tokens
    keep the Triton interpreter (TRITON_INTERPRET=1) quick."""
    torch.manual_seed(0)
    model = reference.DiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=384,
                          depth=1, num_heads=6, num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    torch.save(model.state_dict(), path)
    return str(path)

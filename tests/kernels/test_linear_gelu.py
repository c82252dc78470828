import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE, DTYPES, KERNEL_TOLERANCE, assert_grads_match, assert_parity, requires_cuda

from fastdit.kernels.linear_gelu import gelu_epilogue, linear_gelu, linear_gelu_reference


def make_inputs(dtype, rows=(2, 5), in_features=72, out_features=288):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator)
    return [tensor.to(DEVICE, dtype) for tensor in (x, weight, bias)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [(1, 1), (2, 5), (3, 33)])
def test_matches_reference(dtype, rows):
    x, weight, bias = make_inputs(dtype, rows)
    expected = linear_gelu_reference(*(tensor.float() for tensor in (x, weight, bias)))
    actual = linear_gelu(x, weight, bias)
    assert actual.dtype == dtype and actual.shape == (*rows, weight.shape[0])
    assert_parity(actual, expected, KERNEL_TOLERANCE[dtype])


def test_the_gelu_is_tanh_not_erf():
    """The op's GELU is DiT's tanh approximation: it must not match the erf GELU where they differ."""
    x, weight, bias = make_inputs(torch.float32)
    actual = linear_gelu(x, weight, bias)
    erf = F.gelu(F.linear(x, weight, bias))
    assert (actual - erf).abs().max() > 1e-4


def test_epilogue_on_cuda_only(monkeypatch):
    """The epilogue path is taken on CUDA, and only there: torch's CPU _addmm_activation computes the erf
    GELU, which this test measures, so taking it on the CPU would change the model's function."""
    assert gelu_epilogue(torch.device("cuda")) and not gelu_epilogue(torch.device("cpu"))
    x, weight, bias = make_inputs(torch.float32)
    cpu_epilogue = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]).cpu(), weight.t().cpu(), use_gelu=True)
    erf = F.gelu(F.linear(x, weight, bias)).reshape(cpu_epilogue.shape).cpu()
    assert_parity(cpu_epilogue, erf, 1e-5, "CPU _addmm_activation vs erf GELU")
    calls = []
    monkeypatch.setattr(torch, "_addmm_activation", lambda *args, **kwargs: calls.append(kwargs) or
                        torch.addmm(*args[:3]))
    linear_gelu(x, weight, bias)
    assert calls == ([{"use_gelu": True}] if DEVICE == "cuda" else [])


@requires_cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_cuda_epilogue_matches_tanh(dtype):
    x, weight, bias = make_inputs(dtype, rows=(4, 256), in_features=1152, out_features=4608)
    expected = linear_gelu_reference(*(tensor.float() for tensor in (x, weight, bias)))
    assert_parity(linear_gelu(x, weight, bias), expected, KERNEL_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_autograd_of_reference(dtype):
    inputs = [tensor.requires_grad_(True) for tensor in make_inputs(dtype)]
    grad = torch.randn(inputs[0].shape[:-1] + (inputs[1].shape[0],), generator=torch.Generator().manual_seed(1))
    grad = grad.to(DEVICE, dtype)
    exact_inputs = [tensor.detach().float().requires_grad_(True) for tensor in inputs]
    linear_gelu_reference(*exact_inputs).backward(grad.float())
    linear_gelu(*inputs).backward(grad)
    assert_grads_match([tensor.grad for tensor in inputs], [tensor.grad for tensor in exact_inputs], inputs,
                       ("x", "weight", "bias"))


def test_backward_saves_no_pre_activation():
    """The fused op's autograd keeps x, weight and bias only; the unfused pair also keeps fc1's output."""
    x, weight, bias = (tensor.requires_grad_(True) for tensor in make_inputs(torch.float32))

    def saved_bytes(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(x, weight, bias)
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in saved}.values())

    inputs_bytes = sum(t.numel() * t.element_size() for t in (x, weight, bias))
    pre_activation = x.shape[0] * x.shape[1] * weight.shape[0] * 4
    assert saved_bytes(linear_gelu) == inputs_bytes
    assert saved_bytes(linear_gelu_reference) == inputs_bytes - bias.numel() * 4 + pre_activation


def test_compiles_without_graph_break():
    x, weight, bias = make_inputs(torch.float32)
    compiled = torch.compile(linear_gelu, fullgraph=True)
    assert torch.equal(compiled(x, weight, bias), linear_gelu(x, weight, bias))


@pytest.mark.parametrize("change, message", [
    (lambda x, w, b: (x, w[:, :-1], b), r"linear_gelu: weight must be \(out_features, 72\)"),
    (lambda x, w, b: (x, w, b[:-1]), r"linear_gelu: bias must have shape \(288,\)"),
    (lambda x, w, b: (x, w.double(), b), "linear_gelu: weight must have x's dtype"),
])
def test_bad_input_one_line(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        linear_gelu(*change(*make_inputs(torch.float32)))

import math

import pytest
import torch
from parity import (DEVICE, DTYPES, KERNEL_TOLERANCE, assert_compiled_matches_eager, assert_fails_with_wrong_kernels,
                    assert_parity, launches_kernels, relative_max_error, requires_cuda, requires_triton)

from fastdit.kernels import attention as attention_module
from fastdit.kernels import attention_backward as attention_backward_module
from fastdit.kernels import tuning
from fastdit.kernels.attention import attention, attention_forward, attention_reference, attention_reference_with_lse
from fastdit.kernels.attention_backward import attention_backward, attention_backward_reference
from fastdit.kernels.launch import TRITON_3_6_DEFAULTS, config


# (batch, tokens, heads, head_dim): one token, token counts off any block size, DiT-XL's
# head dim 72 (not a power of two), 96 (64 + 32), and one multi-block sequence (T=256).
SHAPES = [
    (1, 1, 1, 64), (2, 7, 3, 72), (1, 33, 2, 64), (2, 100, 2, 72), (1, 64, 4, 32),
    (1, 50, 1, 128), (1, 17, 2, 96), (1, 256, 1, 72),
]


def make_qkv(batch, tokens, heads, head_dim, dtype, layout="qkv-unbind"):
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    if layout == "qkv-unbind":  # the model's: a qkv linear output split into strided views
        qkv = randn(batch, tokens, 3 * heads * head_dim)
        return qkv.view(batch, tokens, 3, heads, head_dim).unbind(2)
    if layout == "contiguous":
        return tuple(randn(batch, tokens, heads, head_dim) for _ in range(3))
    if layout == "transposed":  # (B, H, T, Dh) storage seen as (B, T, H, Dh)
        return tuple(randn(batch, heads, tokens, head_dim).transpose(1, 2) for _ in range(3))
    if layout == "unaligned":  # views 2 elements into their storage: no 16-byte alignment
        return tuple(randn(batch, tokens, heads, head_dim + 8)[..., 2:head_dim + 2] for _ in range(3))
    if layout == "head-dim-strided":  # head_dim not stride 1: the op copies it
        return tuple(randn(batch, tokens, head_dim, heads).transpose(2, 3) for _ in range(3))
    raise AssertionError(layout)


def expected(q, k, v, softmax_scale=None):
    return attention_reference(q.float(), k.float(), v.float(), softmax_scale)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    q, k, v = make_qkv(*shape, dtype)
    out, lse = attention_forward(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    expected_out, expected_lse = attention_reference_with_lse(q.float(), k.float(), v.float())
    assert_parity(out, expected_out, KERNEL_TOLERANCE[dtype])
    # fp32 in every dtype: the scores accumulate exact products of the inputs in fp32.
    assert lse.dtype == torch.float32
    assert_parity(lse, expected_lse, KERNEL_TOLERANCE[torch.float32], "lse")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "qkv-unbind", "transposed", "unaligned", "head-dim-strided"])
def test_layouts(layout, dtype):
    q, k, v = make_qkv(2, 33, 3, 72, dtype, layout)
    assert_parity(attention(q, k, v), expected(q, k, v), KERNEL_TOLERANCE[dtype])


@requires_triton
@pytest.mark.parametrize("head_dim", [8, 24, 200, 256])
def test_other_head_dims(head_dim):
    q, k, v = make_qkv(1, 20, 2, head_dim, torch.float16)
    assert_parity(attention(q, k, v), expected(q, k, v), KERNEL_TOLERANCE[torch.float16])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_softmax_scale(dtype):
    q, k, v = make_qkv(2, 40, 2, 72, dtype)
    out = attention(q, k, v, softmax_scale=0.3)
    assert_parity(out, expected(q, k, v, 0.3), KERNEL_TOLERANCE[dtype])
    assert relative_max_error(out, expected(q, k, v)) > KERNEL_TOLERANCE[dtype], "the scale made no difference"


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_without_log2e_fails_tolerance(dtype):
    # exp2 of the plain scaled score, log2(e) not folded in: softmax at scale * ln(2).
    q, k, v = make_qkv(2, 40, 2, 72, dtype)
    out = attention(q, k, v)
    wrong = expected(q, k, v, 72 ** -0.5 * math.log(2))
    assert relative_max_error(out, wrong) > KERNEL_TOLERANCE[dtype]


def blockwise_attention(q, k, v, block, rescale):
    """The kernel's online softmax in torch, optionally with the rescale forgotten."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
    scale = q.shape[-1] ** -0.5
    row_max = torch.full(q.shape[:-1], float("-inf"), device=q.device)
    row_sum, out = torch.zeros(q.shape[:-1], device=q.device), torch.zeros_like(q)
    for start in range(0, k.shape[2], block):
        scores = q @ k[:, :, start:start + block].transpose(-1, -2) * scale
        new_max = torch.maximum(row_max, scores.amax(-1))
        probs = torch.exp(scores - new_max[..., None])
        factor = torch.exp(row_max - new_max) if rescale else torch.ones_like(new_max)
        row_sum = row_sum * factor + probs.sum(-1)
        out = out * factor[..., None] + probs @ v[:, :, start:start + block]
        row_max = new_max
    return (out / row_sum[..., None]).transpose(1, 2)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forgotten_rescale_fails_tolerance(dtype):
    # 100 keys span several key blocks of the kernel (and of the torch version, at 32).
    q, k, v = make_qkv(2, 100, 2, 64, dtype)
    q = 3 * q  # peaked rows: the running max moves between key blocks
    out = attention(q, k, v)
    exact = expected(q, k, v)
    assert_parity(out, exact, KERNEL_TOLERANCE[dtype])
    assert_parity(blockwise_attention(q, k, v, 32, rescale=True), exact, KERNEL_TOLERANCE[torch.float32], "torch")
    wrong = blockwise_attention(q, k, v, 32, rescale=False)
    assert relative_max_error(out, wrong) > KERNEL_TOLERANCE[dtype]


# Backward: T off the block sizes (7, 33, 100 > two key blocks), head dims 72 (64 + 16 tail),
# 64, 32 and 128, batch 1 and 2. T=1 is left out: there dq and dk are exactly zero.
GRAD_SHAPES = [(2, 7, 3, 72), (1, 33, 2, 64), (1, 100, 1, 72), (1, 64, 2, 32), (1, 40, 1, 128)]


def kernel_gradients(q, k, v, grad_out, softmax_scale=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # leaves that keep the views' strides
    attention(q, k, v, softmax_scale).backward(grad_out)
    return q.grad, k.grad, v.grad


def reference_gradients(q, k, v, grad_out, softmax_scale=None):
    """Autograd through attention_reference in fp32 on the same inputs."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    attention_reference(q, k, v, softmax_scale).backward(grad_out.float())
    return q.grad, k.grad, v.grad


def assert_gradients_match(q, k, v, grad_out, softmax_scale=None):
    actual = kernel_gradients(q, k, v, grad_out, softmax_scale)
    for name, grad, expected_grad in zip("qkv", actual, reference_gradients(q, k, v, grad_out, softmax_scale)):
        assert grad.dtype == q.dtype and grad.shape == q.shape
        assert_parity(grad, expected_grad, KERNEL_TOLERANCE[q.dtype], f"grad_{name}")


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_gradients_match_reference(shape, dtype):
    q, k, v = make_qkv(*shape, dtype)
    assert_gradients_match(q, k, v, torch.randn(q.shape, device=DEVICE).to(dtype))


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "unaligned", "head-dim-strided"])
def test_gradient_layouts(layout):
    # grad_out in the same layout: the backward reads it through its strides too.
    q, k, v = make_qkv(1, 33, 2, 72, torch.float32, layout)
    assert_gradients_match(q, k, v, make_qkv(1, 33, 2, 72, torch.float32, layout)[0])


@requires_triton
def test_gradients_of_a_sum_and_explicit_scale():
    # out.sum()'s gradient is an expanded (stride 0) tensor of ones.
    q, k, v = make_qkv(2, 20, 2, 72, torch.float32)
    assert_gradients_match(q, k, v, torch.ones(1, device=DEVICE).expand(q.shape), softmax_scale=0.3)


def test_backward_reference_matches_autograd():
    q, k, v = make_qkv(2, 9, 2, 72, torch.float32)
    grad_out = torch.randn(q.shape, device=DEVICE)
    out, lse = attention_reference_with_lse(q, k, v, 0.3)
    grads = attention_backward_reference(grad_out, q, k, v, out, lse, 0.3)
    for grad, expected_grad in zip(grads, reference_gradients(q, k, v, grad_out, 0.3)):
        torch.testing.assert_close(grad, expected_grad)


# Each Triton 3.6 default (launch.TRITON_3_6_DEFAULTS) with its dtypes: the launcher module and the names
# it gives the tile's two blocks.
TRITON_3_6_LAUNCHES = {"attention_forward": (attention_module, ("BLOCK_M", "BLOCK_N")),
                       "attention_backward": (attention_backward_module, ("OUTER", "INNER"))}
TRITON_3_6_CASES = [(launch, tile, dtype) for (launch, dtypes), (tile, _) in TRITON_3_6_DEFAULTS.items()
                    for dtype in ((torch.float32,) if dtypes == "fp32" else (torch.float16, torch.bfloat16))]


@requires_triton
@pytest.mark.parametrize("shape", [(1, 200, 2, 72), (2, 40, 1, 64)], ids=str)
@pytest.mark.parametrize("launch, tile, dtype", TRITON_3_6_CASES, ids=str)
def test_triton_3_6_defaults_match_reference(monkeypatch, launch, tile, dtype, shape):
    """The tiles that Triton 3.6 launches by default, whatever Triton runs the test: the launcher is
    offered that tile alone (interpreted, the blocks are what a tile changes; warps and stages are
    the compiler's). 200 tokens: two 128-blocks, the second partial; 40: one block, mostly padding."""
    module, (owned, looped) = TRITON_3_6_LAUNCHES[launch]
    owned_block, looped_block, warps, stages = tile
    forced = config(warps, stages, **{owned: owned_block, looped: looped_block})
    monkeypatch.setattr(module, "offer", lambda *args, **kwargs: [forced])
    chosen, choose = [], tuning.choose
    monkeypatch.setattr(tuning, "choose", lambda kernel, *args: chosen.append((kernel, choose(kernel, *args))))
    q, k, v = make_qkv(*shape, dtype)
    assert_parity(attention(q, k, v), expected(q, k, v), KERNEL_TOLERANCE[dtype])
    assert_gradients_match(q, k, v, torch.randn(q.shape, device=DEVICE).to(dtype))
    forced_kernels = {"attention_forward"} if launch == "attention_forward" else {"attention_backward_key",
                                                                                  "attention_backward_query"}
    assert {kernel for kernel, launched in chosen if launched == forced} == forced_kernels


def wrong_gradients(q, k, v, grad_out, mistake):
    """(grad_q, grad_k, grad_v) in fp32 torch math with one mistake a backward kernel could make."""
    q, k, v, grad_out = (t.float().transpose(1, 2) for t in (q, k, v, grad_out))  # (B, H, T, Dh)
    scale = q.shape[-1] ** -0.5
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    grad_probs = grad_out @ v.transpose(-1, -2)
    delta = 0 if mistake == "delta forgotten" else (probs * grad_probs).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_k = (grad_scores if mistake == "dS not transposed for dk" else grad_scores.transpose(-1, -2)) @ q
    grads = grad_scores @ k, grad_k, probs.transpose(-1, -2) @ grad_out
    return tuple(g.transpose(1, 2) for g in grads)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrong_backward_fails_tolerance(dtype):
    q, k, v = make_qkv(1, 40, 2, 72, dtype)
    grad_out = torch.randn(q.shape, device=DEVICE).to(dtype)
    actual = kernel_gradients(q, k, v, grad_out)
    for grad, expected_grad in zip(actual, wrong_gradients(q, k, v, grad_out, "no mistake")):
        assert_parity(grad, expected_grad, KERNEL_TOLERANCE[dtype])
    wrong_q, _, _ = wrong_gradients(q, k, v, grad_out, "delta forgotten")
    assert relative_max_error(actual[0], wrong_q) > KERNEL_TOLERANCE[dtype]
    _, wrong_k, _ = wrong_gradients(q, k, v, grad_out, "dS not transposed for dk")
    assert relative_max_error(actual[1], wrong_k) > KERNEL_TOLERANCE[dtype]


@requires_cuda
@launches_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("tokens", [16, 64, 256, 1000, 1024, 4096])
def test_long_sequences_on_gpu(tokens, head_dim, dtype):
    q, k, v = make_qkv(2, tokens, 4, head_dim, dtype)
    assert_parity(attention(q, k, v), expected(q, k, v), KERNEL_TOLERANCE[dtype])


@requires_cuda
@launches_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 72, 256])
@pytest.mark.parametrize("tokens", [256, 1000, 4096])
def test_long_sequence_gradients_on_gpu(tokens, head_dim, dtype):
    q, k, v = make_qkv(1, tokens, 4, head_dim, dtype)
    assert_gradients_match(q, k, v, torch.randn(q.shape, device=DEVICE).to(dtype))


@requires_cuda
@launches_kernels
def test_backward_is_deterministic_on_gpu():
    q, k, v = make_qkv(2, 1000, 4, 72, torch.bfloat16)
    grad_out = torch.randn(q.shape, device=DEVICE).to(torch.bfloat16)
    first, second = kernel_gradients(q, k, v, grad_out), kernel_gradients(q, k, v, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@requires_cuda
@launches_kernels
def test_every_output_element_is_written_on_gpu():
    # The caching allocator hands the freed NaN block back as the op's output.
    q, k, v = make_qkv(1, 1000, 3, 72, torch.float16)
    poison = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    poison_ptr = poison.data_ptr()
    del poison
    out = attention(q, k, v)
    assert out.data_ptr() == poison_ptr, "the allocator did not reuse the poisoned block"
    assert_parity(out, expected(q, k, v), KERNEL_TOLERANCE[torch.float16])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_kernel_fails_the_parity_tests(dtype):
    """Kernels that write every output 10% off fail the forward's and the gradients' parity tests."""
    assert_fails_with_wrong_kernels(test_matches_reference, (2, 7, 3, 72), dtype)
    assert_fails_with_wrong_kernels(test_gradients_match_reference, (2, 7, 3, 72), dtype)


def _bad_inputs(case):
    q, k, v = make_qkv(2, 5, 2, 64, torch.float32, "contiguous")
    scale = None
    if case == "k shape":
        k = k[:, :4]
    elif case == "v heads":
        v = make_qkv(2, 5, 3, 64, torch.float32)[2]
    elif case == "head_dim 70":
        q, k, v = make_qkv(2, 5, 2, 70, torch.float32)
    elif case == "head_dim 264":
        q, k, v = make_qkv(1, 3, 1, 264, torch.float32)
    elif case == "q rank 3":
        q, k, v = (t.flatten(2) for t in (q, k, v))
    elif case == "q int dtype":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "v dtype":
        v = v.half()
    elif case == "scale zero":
        scale = 0.0
    return q, k, v, scale


@pytest.mark.parametrize(
    "case, error, name",
    [
        ("k shape", ValueError, "k"),
        ("v heads", ValueError, "v"),
        ("head_dim 70", ValueError, "q"),
        ("head_dim 264", ValueError, "q"),
        ("q rank 3", ValueError, "q"),
        ("q int dtype", TypeError, "q"),
        ("v dtype", TypeError, "v"),
        ("scale zero", ValueError, "softmax_scale"),
    ],
)
def test_bad_inputs_name_the_argument(case, error, name):
    with pytest.raises(error, match=rf"^attention: {name} must .*, got "):
        attention(*_bad_inputs(case))


@pytest.mark.parametrize("case, name", [("grad_out shape", "grad_out"), ("lse dtype", "lse")])
def test_backward_bad_inputs_name_the_argument(case, name):
    q, k, v = make_qkv(2, 5, 2, 64, torch.float32)
    out, lse = attention_forward(q, k, v)
    grad_out = out[:, :4] if case == "grad_out shape" else torch.ones_like(out)
    lse = lse.double() if case == "lse dtype" else lse
    with pytest.raises(ValueError, match=rf"^attention_backward: {name} must .*, got "):
        attention_backward(grad_out, q, k, v, out, lse, 0.125)


@launches_kernels
def test_torch_compile_fullgraph_forward_and_backward_match_eager():
    def self_attention(qkv, heads):
        batch, tokens, width = qkv.shape
        q, k, v = qkv.view(batch, tokens, 3, heads, width // (3 * heads)).unbind(2)
        return attention(q, k, v).view(batch, tokens, width // 3)

    qkv = torch.randn(2, 9, 3 * 2 * 72, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(2, 9, 2 * 72, device=DEVICE)

    def forward_and_backward(fn):
        out = fn(qkv, 2)
        return out, *torch.autograd.grad(out, qkv, grad_out)

    assert_compiled_matches_eager(forward_and_backward, self_attention, ("output", "grad of qkv"))


@launches_kernels
def test_opcheck():
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(2, 9, 1, 72, torch.float16))
    torch.library.opcheck(attention_forward, (q, k, v), {"softmax_scale": 0.2})
    out, lse = attention_forward(q, k, v, 0.2)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(attention_backward, (grad_out, *(t.detach() for t in (q, k, v, out, lse)), 0.2))


def test_the_torch_path_stays_fp32_under_autocast():
    """A custom op's body runs under the caller's autocast: the torch path's scores and lse must not drop to bf16
    (the backward refuses a bf16 lse; training with autocast on the CPU stopped there)."""
    q, k, v = (torch.randn(2, 19, 3, 16, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    expected_out, expected_lse = attention_reference_with_lse(q, k, v)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, lse = attention_reference_with_lse(q, k, v)
    assert lse.dtype == torch.float32 and torch.equal(lse, expected_lse) and torch.equal(out, expected_out)

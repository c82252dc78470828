import math

import pytest
import torch
from parity import DTYPES, KERNEL_TOLERANCE, assert_parity, relative_max_error

from fastdit.kernels import kernel_path
from fastdit.kernels.attention import attention, attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    kernel_path(DEVICE) == "torch",
    reason="no Triton path on this device (set TRITON_INTERPRET=1): the op would run its own reference",
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (long sequences, the CUDA caching allocator)")

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
    out = attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert_parity(out, expected(q, k, v), KERNEL_TOLERANCE[dtype])


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
    row_max = torch.full(q.shape[:-1], float("-inf"))
    row_sum, out = torch.zeros(q.shape[:-1]), torch.zeros_like(q)
    for start in range(0, k.shape[2], block):
        scores = q @ k[:, :, start:start + block].transpose(-1, -2) * scale
        new_max = torch.maximum(row_max, scores.amax(-1))
        probs = torch.exp(scores - new_max[..., None])
        factor = torch.exp(row_max - new_max) if rescale else torch.ones_like(new_max)
        row_sum = row_sum * factor + probs.sum(-1)
        out = out * factor[..., None] + probs @ v[:, :, start:start + block]
        row_max = new_max
    return (out / row_sum[..., None]).transpose(1, 2)


def test_forgotten_rescale_fails_tolerance():
    q, k, v = (t.cpu().float() for t in make_qkv(2, 100, 2, 64, torch.float32))
    q = 3 * q  # peaked rows: the running max moves between key blocks
    exact = attention_reference(q, k, v)
    assert_parity(blockwise_attention(q, k, v, 32, rescale=True), exact, KERNEL_TOLERANCE[torch.float32])
    wrong = blockwise_attention(q, k, v, 32, rescale=False)
    assert relative_max_error(wrong, exact) > max(KERNEL_TOLERANCE.values())


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("tokens", [16, 64, 256, 1000, 1024, 4096])
def test_long_sequences_on_gpu(tokens, head_dim, dtype):
    q, k, v = make_qkv(2, tokens, 4, head_dim, dtype)
    assert_parity(attention(q, k, v), expected(q, k, v), KERNEL_TOLERANCE[dtype])


@requires_cuda
def test_every_output_element_is_written_on_gpu():
    # The caching allocator hands the freed NaN block back as the op's output.
    q, k, v = make_qkv(1, 1000, 3, 72, torch.float16)
    poison = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    poison_ptr = poison.data_ptr()
    del poison
    out = attention(q, k, v)
    assert out.data_ptr() == poison_ptr, "the allocator did not reuse the poisoned block"
    assert_parity(out, expected(q, k, v), KERNEL_TOLERANCE[torch.float16])


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
    with pytest.raises(error, match=rf"^attention: {name}\b"):
        attention(*_bad_inputs(case))


def test_torch_compile_fullgraph_matches_eager():
    def self_attention(qkv, heads):
        batch, tokens, width = qkv.shape
        q, k, v = qkv.view(batch, tokens, 3, heads, width // (3 * heads)).unbind(2)
        return attention(q, k, v).view(batch, tokens, width // 3)

    qkv = torch.randn(2, 9, 3 * 2 * 72, device=DEVICE)
    compiled = torch.compile(self_attention, fullgraph=True)
    assert torch.equal(compiled(qkv, 2), self_attention(qkv, 2))


def test_opcheck():
    q, k, v = make_qkv(2, 9, 2, 72, torch.float16)
    torch.library.opcheck(attention, (q, k, v), {"softmax_scale": 0.2})

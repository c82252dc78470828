import pytest
import torch
from parity import DTYPES, KERNEL_TOLERANCE, assert_parity, relative_max_error

from fastdit.kernels import kernel_path
from fastdit.kernels.patch_embed import patch_embed, patch_embed_reference

triton_only = pytest.mark.skipif(
    kernel_path("cpu") == "torch",
    reason="no Triton path on cpu (set TRITON_INTERPRET=1): the op would be compared with itself",
)

# (B, C, H, W, p, D). K = C*p*p runs 4..256: below tl.dot's 16 (padded), a partial K block
# (12, 48) and several K blocks (64, 256); token counts 1, 9, 15 (non-square image), 16.
CONFIGS = [
    (1, 4, 8, 8, 2, 384),
    (2, 4, 16, 16, 4, 72),
    (2, 1, 8, 8, 2, 96),
    (1, 3, 12, 12, 4, 200),
    (2, 4, 16, 16, 8, 1152),
    (3, 4, 6, 10, 2, 64),
    (1, 3, 4, 6, 2, 768),
    (1, 4, 8, 8, 8, 1024),
]


def _inputs(batch, channels, height, width, patch, hidden_size, dtype):
    tokens = (height // patch) * (width // patch)
    x = torch.randn(batch, channels, height, width)
    weight = torch.randn(hidden_size, channels, patch, patch) / (channels * patch * patch) ** 0.5
    bias = torch.randn(hidden_size)
    pos_embed = torch.randn(1, tokens, hidden_size)
    return [t.to(dtype) for t in (x, weight, bias, pos_embed)]


def _expected(x, weight, bias, pos_embed):
    return patch_embed_reference(x.float(), weight.float(), bias.float(), pos_embed.float())


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "B{}C{}H{}W{}p{}D{}".format(*c))
def test_matches_reference(config, dtype):
    x, weight, bias, pos_embed = _inputs(*config, dtype)
    out = patch_embed(x, weight, bias, pos_embed)
    assert out.dtype == dtype and out.is_contiguous()
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "strided_slice", "transposed_hw"])
def test_non_contiguous_x(layout, dtype):
    x, weight, bias, pos_embed = _inputs(2, 4, 8, 12, 2, 72, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided_slice":
        x = torch.cat([x, x], dim=-1)[..., 1::2]  # W stride 2, storage offset 1
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    out = patch_embed(x, weight, bias, pos_embed)
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_parameters(dtype):
    x, weight, bias, pos_embed = _inputs(2, 3, 8, 8, 4, 200, dtype)
    weight = weight.transpose(0, 3).contiguous().transpose(0, 3)  # same values, D no longer outermost
    bias = torch.stack([bias, torch.zeros_like(bias)], dim=1)[:, 0]
    pos_embed = pos_embed[0].t().contiguous().t()  # (T, D) with D strided
    assert not (weight.is_contiguous() or bias.is_contiguous() or pos_embed.is_contiguous())
    out = patch_embed(x, weight, bias, pos_embed)
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


@triton_only
def test_pos_embed_2d_equals_3d():
    x, weight, bias, pos_embed = _inputs(2, 4, 8, 8, 2, 96, torch.float32)
    assert pos_embed.dim() == 3
    torch.testing.assert_close(patch_embed(x, weight, bias, pos_embed[0]),
                               patch_embed(x, weight, bias, pos_embed), rtol=0, atol=0)


@triton_only
def test_empty_batch():
    x, weight, bias, pos_embed = _inputs(0, 4, 8, 8, 2, 64, torch.float32)
    assert patch_embed(x, weight, bias, pos_embed).shape == (0, 16, 64)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", ["pixels_transposed_in_patch", "patches_transposed"])
def test_wrong_variant_fails(wrong, dtype):
    """The tolerance catches a kernel that reads patches in the wrong order."""
    batch, channels, height, width, patch, hidden_size = 2, 4, 8, 8, 2, 96
    x, weight, bias, pos_embed = _inputs(batch, channels, height, width, patch, hidden_size, dtype)
    out = patch_embed(x, weight, bias, pos_embed)
    if wrong == "pixels_transposed_in_patch":  # column k = c*p*p + j*p + i
        wrong_out = _expected(x, weight.transpose(2, 3), bias, pos_embed)
    else:  # token = wp*(H/p) + hp, with pos_embed still added in the right order
        grid = (batch, height // patch, width // patch, hidden_size)
        convolved = _expected(x, weight, bias, torch.zeros_like(pos_embed)).view(grid)
        wrong_out = convolved.transpose(1, 2).reshape(out.shape) + pos_embed.float()
    assert relative_max_error(out, wrong_out) > KERNEL_TOLERANCE[dtype]
    assert_parity(out, _expected(x, weight, bias, pos_embed), KERNEL_TOLERANCE[dtype])


def _break(arguments, what):
    x, weight, bias, pos_embed = arguments
    if what == "x_rank":
        return x[0], weight, bias, pos_embed
    if what == "x_not_divisible":
        return x[..., :7], weight, bias, pos_embed
    if what == "weight_channels":
        return x, weight[:, :3], bias, pos_embed
    if what == "weight_not_square":
        return x, weight[..., :1], bias, pos_embed
    if what == "bias_shape":
        return x, weight, bias[:-1], pos_embed
    if what == "pos_embed_tokens":
        return x, weight, bias, pos_embed[:, :-1]
    if what == "pos_embed_hidden":
        return x, weight, bias, pos_embed[..., :-1]
    if what == "pos_embed_dtype":
        return x, weight, bias, pos_embed.half()
    if what == "weight_dtype":
        return x, weight.bfloat16(), bias, pos_embed
    if what == "x_dtype":
        return tuple(t.double() for t in arguments)
    raise AssertionError(what)


@pytest.mark.parametrize("what, error, names", [
    ("x_rank", ValueError, r"\bx\b"),
    ("x_not_divisible", ValueError, r"\bx\b.*p=2"),
    ("weight_channels", ValueError, r"weight.*C=4"),
    ("weight_not_square", ValueError, r"weight"),
    ("bias_shape", ValueError, r"bias"),
    ("pos_embed_tokens", ValueError, r"pos_embed.*\(1, 16, 64\)"),
    ("pos_embed_hidden", ValueError, r"pos_embed"),
    ("pos_embed_dtype", TypeError, r"pos_embed"),
    ("weight_dtype", TypeError, r"weight"),
    ("x_dtype", TypeError, r"\bx\b"),
])
def test_bad_inputs_name_the_argument(what, error, names):
    arguments = _break(_inputs(2, 4, 8, 8, 2, 64, torch.float32), what)
    with pytest.raises(error, match=names):
        patch_embed(*arguments)


@triton_only
def test_torch_compile_fullgraph_matches_eager():
    x, weight, bias, pos_embed = _inputs(2, 4, 8, 12, 2, 72, torch.float32)

    def embed(x, weight, bias, pos_embed):
        return patch_embed(x, weight, bias, pos_embed)

    compiled = torch.compile(embed, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias, pos_embed), embed(x, weight, bias, pos_embed),
                               rtol=0, atol=0)

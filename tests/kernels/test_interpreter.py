"""fastdit.kernels.interpreter: interpreted stores round as compiled ones do (the same test holds compiled)."""
import torch
import triton
import triton.language as tl
from parity import DEVICE, requires_triton

from fastdit.kernels.interpreter import to_storage

FP8 = torch.float8_e4m3fn


@triton.jit
def _store_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(out_ptr + offsets, to_storage(x, out_ptr.dtype.element_ty), mask=offsets < n)


def stored(x, dtype):
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _store_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


@requires_triton
def test_fp8_store_rounds_to_nearest_even_and_saturates():
    """fp32 -> E4M3 as ``cvt.rn.satfinite``: bit-equal to torch's conversion (round to nearest even) of the value
    clamped to +-448, for every E4M3 value, every midpoint between two (the ties), -0.0, values past 448, and
    random values over E4M3's range (the interpreter alone stored 127.99 as 64)."""
    every = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    every = every[~every.isnan()].sort().values
    generator = torch.Generator().manual_seed(0)
    random = torch.cat([torch.randn(4000, generator=generator) * scale for scale in (1e-3, 3e-2, 1.0, 30.0, 300.0)])
    x = torch.cat([every, (every[1:] + every[:-1]) / 2, torch.tensor([-0.0, 460.0, -1e6, 127.99]), random])
    out = stored(x.to(DEVICE), FP8).cpu()
    expected = x.clamp(-448, 448).to(FP8)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), (out.float() - expected.float()).abs().max()

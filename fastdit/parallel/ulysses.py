"""Ulysses sequence parallelism for the fast DiT: each of N ranks holds T/N tokens of every image.

Between attentions a rank's tokens go through the MLP, the adaLN modulations and the fused residual kernels on
their own: those are per-token, so a rank runs them on its (B, T/N, D) piece unchanged. Attention is the one
step that mixes tokens: an all-to-all turns each rank's (T/N tokens, all H heads) of q, k and v into (all T
tokens, H/N heads), attention runs on those heads as on one device, and a second all-to-all turns its output
back into (T/N tokens, all heads) before the projection. So H must divide by N.

Token counts N does not divide are padded at the end of the sequence to a multiple of N. The padding never
enters attention: after the first all-to-all every rank holds the whole sequence in order, so it attends over
the first T tokens only (a slice, exact, no mask needed), and the padded rows of the output are zeros that no
real token reads. The model's final projection runs per rank, and one all-gather of its (T/N, p * p * C) output
rebuilds the image.
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastdit.models.attention import attention
from fastdit.models.fp8 import QuantizedActivation
from fastdit.reference import CONDITION_TOKENS


def all_to_all(pieces: torch.Tensor, group) -> torch.Tensor:
    """``pieces`` (N, ...): piece i goes to rank i; returns (N, ...) whose piece i came from rank i."""
    received = torch.empty_like(pieces, memory_format=torch.contiguous_format)
    dist.all_to_all_single(received, pieces.contiguous(), group=group)
    return received


def all_gather(piece: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's ``piece`` (all the same shape), concatenated along ``dim`` in rank order."""
    pieces = [torch.empty_like(piece, memory_format=torch.contiguous_format)
              for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, piece.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


class UlyssesAttention(nn.Module):
    """A fast ``Attention`` (qkv, attention, proj) on a rank's (B, T/N, D) tokens, attending over all T."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.degree = dist.get_world_size(group)
        self.tokens = None  # the sequence's real length T, set by ``sequence_parallel`` for each forward

    def forward(self, h):
        qkv = self.inner.qkv(h)  # h: (B, T/N, D), or its QuantizedActivation in an FP8 model
        batch, local, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        n, heads, head_dim = self.degree, self.inner.num_heads // self.degree, self.inner.head_dim
        qkv = qkv.view(batch, local, 3, n, heads, head_dim).permute(3, 0, 1, 2, 4, 5)
        qkv = all_to_all(qkv, self.group)  # piece i: rank i's tokens, this rank's heads
        # (B, N * T/N, 3, H/N, Dh): the whole sequence in order, padding last, so the slice drops exactly it
        qkv = qkv.permute(1, 0, 2, 3, 4, 5).reshape(batch, n * local, 3, heads, head_dim)[:, :self.tokens]
        q, k, v = qkv.unbind(2)
        out = attention(q, k, v, self.inner.attn_backend)
        out = F.pad(out, (0, 0, 0, 0, 0, n * local - self.tokens))
        out = all_to_all(out.view(batch, n, local, heads, head_dim).transpose(0, 1), self.group)  # piece i: heads i
        return self.inner.proj(out.permute(1, 2, 0, 3, 4).reshape(batch, local, dim))


def check_model(model, degree: int):
    """The fast DiT's parts that sequence parallelism runs, and heads that divide by the degree."""
    from fastdit.models.dit import DiT
    if not isinstance(model, DiT):
        raise TypeError(f"parallel sp: needs a fastdit.DiT (its forward in parts, fused per-token kernels), got "
                        f"{type(model).__module__}.{type(model).__name__}")
    if model.num_heads % degree:
        raise ValueError(f"parallel sp: the sp degree must divide the model's attention heads, got degree {degree} "
                         f"for {model.num_heads} heads (use a degree among "
                         f"{[d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]})")


@contextlib.contextmanager
def swapped_attention(model, wrappers):
    """Each block's self-attention replaced by its wrapper for the duration (restored even on error)."""
    originals = [block.attn for block in model.blocks]
    try:
        for block, wrapper in zip(model.blocks, wrappers):
            block.attn = wrapper
        yield
    finally:
        for block, original in zip(model.blocks, originals):
            block.attn = original


def sequence_parallel(model, wrappers, group, x, t, y):
    """``model(x, t, y)`` with the tokens split over ``group``; ``wrappers``: one UlyssesAttention per block.
    Every rank returns the whole output."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    # The patch embedding, the conditioning and the modulations run on every rank: together a few percent of
    # one block's FLOPs, and they leave each rank its tokens without a scatter.
    x, h, modulations = model.embed(x, t, y)
    tokens = x.shape[1]
    local = -(-tokens // n)

    def piece(stream):  # zero padding: LayerNorm of a zero row is finite, and no real token reads it
        return F.pad(stream, (0, 0, 0, n * local - tokens))[:, rank * local:(rank + 1) * local].contiguous()

    for wrapper in wrappers:
        wrapper.tokens = tokens
    # An FP8 model's h is quantized per token: its values and scales are split alike.
    h = h.map(piece) if isinstance(h, QuantizedActivation) else piece(h)
    with swapped_attention(model, wrappers):
        _, h = model.run_blocks(piece(x), h, modulations, 0, len(model.blocks))
    out = all_gather(model.final_layer(h), group, dim=1)[:, :tokens]
    if model.block == "in-context":
        out = out[:, CONDITION_TOKENS:]
    return model.unpatchify(out)

"""Transformer blocks of the SDXL UNet: attention, GEGLU feed-forward, the spatial transformer.

Attention runs through `scaled_dot_product_attention`, so GPUs get the flash / memory-efficient
kernels. Names match the official checkpoint (`attn1.to_q`, `ff.net.0.proj`, `proj_out`, ...).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sgm.models.layers import GroupNorm32, zero_module


class Attention(nn.Module):
    """Multi-head attention: q from `x`, k/v from `context` (or `x` for self-attention); no q/k/v bias."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(p=0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        batch, length, _ = x.shape
        q, k, v = (
            self._split_heads(self.to_q(x)),
            self._split_heads(self.to_k(context)),
            self._split_heads(self.to_v(context)),
        )
        out = F.scaled_dot_product_attention(q, k, v)  # default scale = dim_head ** -0.5
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))

    def _split_heads(self, t: Tensor) -> Tensor:
        """[B, N, H*D] -> [B, H, N, D] as a view (SDPA accepts the strides)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class GEGLU(nn.Module):
    """Linear to 2x width, then value * GELU(gate) (exact GELU, value half first)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(C -> 4C) then Linear(4C -> C); `net.0` / `net.2` as in the checkpoint."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(p=0.0), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the text context, and GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, Linear proj_in over pixels as tokens, `depth` transformer blocks, zero-init proj_out, residual."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, groups: int = 32
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)

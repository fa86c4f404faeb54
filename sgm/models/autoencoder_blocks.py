"""Building blocks of SDXL's VAE, named so the state dict matches the official `first_stage_model.*`.

Encoder: conv_in, levels `down.i` (res blocks `block.j`, a `downsample` on all but the last),
`mid` (block_1, single-head attn_1, block_2), norm_out, conv_out to 2 x z_channels (mean, logvar).
Decoder: conv_in, `mid`, levels `up.i` (num_res_blocks + 1 blocks, an `upsample` on all but
level 0) run from the deepest level up, norm_out, conv_out. GroupNorm eps 1e-6, SiLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """The VAE's normalization: GroupNorm with eps 1e-6 (the UNet uses 1e-5)."""
    if channels % groups:
        raise ValueError(f"VAE width {channels} is not divisible by norm_num_groups {groups}; pick a divisor")
    return nn.GroupNorm(groups, channels, eps=1e-6)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a residual (1x1 `nin_shortcut` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_num_groups)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_num_groups)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.nin_shortcut = conv1x1(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv q, k, v and proj_out."""

    def __init__(self, channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_num_groups)
        self.q = conv1x1(channels, channels)
        self.k = conv1x1(channels, channels)
        self.v = conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(batch, 1, channels, height * width).transpose(2, 3)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(2, 3).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a 3x3 stride-2 convolution (no padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_num_groups)
        self.attn_1 = AttnBlock(channels, norm_num_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_num_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: res blocks `block.j`, then an optional `downsample` or `upsample`."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, norm_num_groups: int, resample: str | None
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], norm_num_groups) for j in range(num_blocks))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    """Images [B, in_channels, H, W] -> moments [B, 2 * z_channels, H/f, W/f]."""

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        norm_num_groups: int,
    ) -> None:
        super().__init__()
        widths = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_in = conv3x3(in_channels, ch)
        self.down = nn.ModuleList(
            Level(widths[i], widths[i + 1], num_res_blocks, norm_num_groups, "down" if i < last else None)
            for i in range(len(ch_mult))
        )
        self.mid = MidBlock(widths[-1], norm_num_groups)
        self.norm_out = group_norm(widths[-1], norm_num_groups)
        self.conv_out = conv3x3(widths[-1], 2 * z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] -> images [B, out_channels, h*f, w*f]; up.i runs deepest first."""

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        norm_num_groups: int,
    ) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = conv3x3(z_channels, widths[-1])
        self.mid = MidBlock(widths[-1], norm_num_groups)
        # Level i reads the width of level i+1 (the deepest reads its own) and upsamples unless i == 0.
        inputs = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(
            Level(inputs[i], widths[i], num_res_blocks + 1, norm_num_groups, "up" if i > 0 else None)
            for i in range(len(ch_mult))
        )
        self.norm_out = group_norm(widths[0], norm_num_groups)
        self.conv_out = conv3x3(widths[0], out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

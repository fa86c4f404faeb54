"""The SDXL UNet (official `openaimodel.UNetModel` layout, SDXL configuration space).

Block index layout (keys `input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`):
input block 0 is the stem conv; each level then adds `num_res_blocks` blocks of [ResBlock,
(SpatialTransformer)] and, except the last level, one [Downsample]. The middle block is
[ResBlock, SpatialTransformer, ResBlock] (the transformer is left out when its depth is 0).
Output blocks walk the levels in reverse with `num_res_blocks + 1` blocks each, every block
concatenating one skip from the input side; the last block of each level except level 0 ends
in an Upsample. SDXL base = `UNetModel()`; the refiner is `UNetModel(384, (1, 2, 4, 4), ...)`
(see configs/model/sdxl_refiner.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sgm.models.attention import SpatialTransformer
from sgm.models.layers import Downsample, GroupNorm32, ResBlock, Upsample, timestep_embedding, zero_module


class UNetBlock(nn.Sequential):
    """A sequence of layers; ResBlocks also get the embedding, transformers the text context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Noise-prediction UNet conditioned on timestep, text context ([B, 77, context_dim]) and vector y."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        transformer_depth: Sequence[int] = (0, 2, 10),
        transformer_depth_middle: int = 10,
        num_head_channels: int = 64,
        context_dim: int = 2048,
        adm_in_channels: int = 2816,
        norm_num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channel_mult, transformer_depth = tuple(channel_mult), tuple(transformer_depth)
        _check_config(
            model_channels,
            channel_mult,
            transformer_depth,
            transformer_depth_middle,
            num_head_channels,
            norm_num_groups,
        )
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.context_dim, self.adm_in_channels = context_dim, adm_in_channels
        self.num_levels = len(channel_mult)
        self.gradient_checkpointing = gradient_checkpointing
        emb_dim = 4 * model_channels
        groups = norm_num_groups

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, ch // num_head_channels, num_head_channels, depth, context_dim, groups)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch = [model_channels], model_channels
        for level, (mult, depth) in enumerate(zip(channel_mult, transformer_depth)):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * model_channels, groups)]
                ch = mult * model_channels
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != self.num_levels - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb_dim, ch, groups)]
        if transformer_depth_middle > 0:
            middle.append(transformer(ch, transformer_depth_middle))
        self.middle_block = UNetBlock(*middle, ResBlock(ch, emb_dim, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            mult, depth = channel_mult[level], transformer_depth[level]
            for index in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * model_channels, groups)]
                ch = mult * model_channels
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level > 0 and index == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch, eps=1e-5),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each input/middle/output block in backward instead of storing its activations."""
        self.gradient_checkpointing = enabled

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor) -> Tensor:
        """x [B, C, H, W], timesteps [B] (discrete index), context [B, T, context_dim], y [B, adm_in_channels]."""
        self._check_inputs(x, context, y)
        # Inputs follow the parameter dtype (no-op in fp32 / autocast), so a bf16 model takes fp32 latents and text.
        dtype = self.time_embed[0].weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(dtype))

        skips, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _run(self, block: UNetBlock, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def _check_inputs(self, x: Tensor, context: Tensor, y: Tensor) -> None:
        factor = 2 ** (self.num_levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"UNet input must be [B, {self.in_channels}, H, W] with H and W divisible by {factor}, got "
                f"{tuple(x.shape)}; use image sizes that are multiples of {8 * factor} pixels"
            )
        if context.shape[-1] != self.context_dim or y.shape[-1] != self.adm_in_channels:
            raise ValueError(
                f"UNet expects context [..., {self.context_dim}] and y [..., {self.adm_in_channels}], got "
                f"{tuple(context.shape)} and {tuple(y.shape)}; match the conditioner's output sizes to the UNet config"
            )


def _check_config(
    model_channels: int,
    channel_mult: tuple,
    transformer_depth: tuple,
    transformer_depth_middle: int,
    num_head_channels: int,
    groups: int,
) -> None:
    """Fail at build time with one clear message instead of a shape error deep inside forward."""
    if len(transformer_depth) != len(channel_mult):
        raise ValueError(
            f"transformer_depth has {len(transformer_depth)} entries but channel_mult has {len(channel_mult)}; "
            "give one transformer depth per level (0 = no attention at that level)"
        )
    depths = transformer_depth[:-1] + (max(transformer_depth[-1], transformer_depth_middle),)
    for mult, depth in zip(channel_mult, depths):
        ch = mult * model_channels
        if ch % groups:
            raise ValueError(f"level width {ch} is not divisible by norm_num_groups={groups}; change model_channels")
        if depth > 0 and ch % num_head_channels:
            raise ValueError(
                f"level width {ch} is not divisible by num_head_channels={num_head_channels}; change one of them"
            )

"""Exponential moving average of the UNet weights, kept as a module so checkpoints carry it."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """shadow <- d * shadow + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)).

    The warmup (n = updates so far) is the official LitEma's: early averages follow the weights
    closely instead of being dominated by the random init. `shadow` is a frozen copy of the network,
    so it can stand in for it (validation samples, export); buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay} (module.ema_decay; null turns EMA off)")
        self.decay = float(decay)
        self.shadow = copy.deepcopy(model).eval()
        self.shadow.requires_grad_(False)
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average `model`'s parameters into the shadow (call once per optimizer step)."""
        decay = self.current_decay()
        shadow = dict(self.shadow.named_parameters())
        for name, param in model.named_parameters():
            target = shadow[name]
            target.lerp_(param.detach().to(target.dtype), 1.0 - decay)
        shadow_buffers = dict(self.shadow.named_buffers())
        for name, buffer in model.named_buffers():
            shadow_buffers[name].copy_(buffer)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        """The shadow always stays in eval mode."""
        super().train(mode)
        self.shadow.eval()
        return self

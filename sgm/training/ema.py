"""Exponential moving average of the UNet weights: fp32, whole on every rank, also under DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

# Under ZeRO-3 parameters are gathered this many elements at a time to update the average
# (bounds the transient memory: 2^27 elements = 256 MB in bf16).
GATHER_NUMEL = 1 << 27


class EMA(nn.Module):
    """shadow <- d * shadow + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)).

    The warmup (n = updates so far) is the official LitEma's: early averages follow the weights
    closely instead of being dominated by the random init. `shadow` is a frozen copy of the network,
    so it can stand in for it (validation samples, export); buffers are copied, not averaged.

    Under DeepSpeed the training module keeps the EMA outside the engine's module tree, so it stays
    fp32 and whole: with ZeRO-2 the weights are whole on every rank and are averaged directly; with
    ZeRO-3 they are partitioned, and each update gathers them chunk by chunk on every rank (a
    collective: call `update` on all ranks), so each rank holds the whole fp32 average.
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
        """Average `model`'s parameters into the shadow (call once per optimizer step, on every rank)."""
        self._blend(model, 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Restart the average at `model`'s current weights (EMA switched on for a run that had none)."""
        self._blend(model, 1.0)
        self.num_updates.zero_()

    def _blend(self, model: nn.Module, weight: float) -> None:
        shadow = dict(self.shadow.named_parameters())
        for chunk in _whole_parameters(list(model.named_parameters())):
            for name, param in chunk:
                target = shadow[name]
                target.lerp_(param.detach().to(device=target.device, dtype=target.dtype), weight)
        shadow_buffers = dict(self.shadow.named_buffers())
        for name, buffer in model.named_buffers():
            shadow_buffers[name].copy_(buffer)

    def train(self, mode: bool = True) -> EMA:
        """The shadow always stays in eval mode."""
        super().train(mode)
        self.shadow.eval()
        return self


def _whole_parameters(named: list[tuple[str, nn.Parameter]]) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Yield the parameters in chunks, each whole while it is handled (ZeRO-3 ones are gathered for it)."""
    if not any(hasattr(param, "ds_id") for _, param in named):
        yield named
        return
    import deepspeed  # only ever reached under ZeRO-3, where it is installed

    chunk: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, param in named:
        chunk.append((name, param))
        size += int(getattr(param, "ds_numel", param.numel()))
        if size >= GATHER_NUMEL:
            with deepspeed.zero.GatheredParameters([p for _, p in chunk]):
                yield chunk
            chunk, size = [], 0
    if chunk:
        with deepspeed.zero.GatheredParameters([p for _, p in chunk]):
            yield chunk

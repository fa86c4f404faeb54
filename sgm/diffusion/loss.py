"""The training loss: noise the latents at a sampled level, denoise, weight the x0-space error."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from sgm.diffusion.common import append_dims, randn
from sgm.diffusion.denoiser import DiscreteDenoiser, Network
from sgm.diffusion.noise_levels import DiscreteTimestepSampler


class DiffusionLoss:
    """Per-sample weighted l2 loss: w(sigma) * mean_{C,H,W} (D(x0 + sigma n) - x0)^2.

    Offset noise (SDXL's last stage used 0.05) adds `offset_noise_level * N(0, 1)` to n, one value
    per sample broadcast over C, H, W as the SDXL 1.0 code does, or one per (sample, channel) with
    `offset_noise_per_channel`. It changes only the noise that builds x_n; the target stays x0.
    The denoiser is used, not owned: the training module holds it (and its `sigmas` buffer).
    """

    def __init__(
        self,
        denoiser: DiscreteDenoiser,
        noise_level_sampler: DiscreteTimestepSampler,
        weighting: Callable[[Tensor], Tensor],
        offset_noise_level: float = 0.0,
        offset_noise_per_channel: bool = False,
    ) -> None:
        if offset_noise_level < 0:
            raise ValueError(f"offset_noise_level must be >= 0, got {offset_noise_level}")
        self.denoiser = denoiser
        self.noise_level_sampler = noise_level_sampler
        self.weighting = weighting
        self.offset_noise_level = float(offset_noise_level)
        self.offset_noise_per_channel = offset_noise_per_channel

    def sample_noise(self, latents: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """n ~ N(0, 1) like the latents, plus the offset noise if enabled."""
        noise = randn(latents.shape, generator, latents.device, latents.dtype)
        if self.offset_noise_level > 0:
            channels = latents.shape[1] if self.offset_noise_per_channel else 1
            offset = randn((latents.shape[0], channels), generator, latents.device, latents.dtype)
            noise = noise + self.offset_noise_level * append_dims(offset, latents.ndim)
        return noise

    def __call__(
        self,
        network: Network,
        latents: Tensor,
        cond: Mapping[str, Tensor],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Loss per sample, float32 [B]; the caller takes the batch mean."""
        sigmas, _ = self.noise_level_sampler(latents.shape[0], generator, latents.device)
        return self.loss_at(network, latents, cond, sigmas, self.sample_noise(latents, generator))

    def loss_at(
        self, network: Network, latents: Tensor, cond: Mapping[str, Tensor], sigmas: Tensor, noise: Tensor
    ) -> Tensor:
        """The loss per sample at given noise levels and noise (the draws fixed: held-out validation), float32 [B]."""
        noised = latents + noise * append_dims(sigmas, latents.ndim).to(latents.dtype)
        denoised = self.denoiser(network, noised, sigmas, cond)
        weight = append_dims(self.weighting(sigmas), latents.ndim)
        error = (denoised.float() - latents.float()) ** 2
        return (weight * error).flatten(1).mean(dim=1)

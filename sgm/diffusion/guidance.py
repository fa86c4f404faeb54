"""Guidance: turn (denoiser, network, cond, uncond) into the denoise(x, sigma) callable a sampler uses."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from sgm.diffusion.denoiser import DiscreteDenoiser, Network
from sgm.diffusion.samplers import Denoise


class NoGuidance:
    """The conditional denoiser alone (one forward per step); `uncond` is ignored."""

    def __call__(
        self,
        denoiser: DiscreteDenoiser,
        network: Network,
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor] | None = None,
    ) -> Denoise:
        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            return denoiser(network, x, sigma, cond)

        return denoise


class ClassifierFreeGuidance:
    """D_u + scale (D_c - D_u), both halves in one batched forward, unconditional first.

    At scale 1 this is D_c exactly, so that case runs the conditional half only.
    """

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(
        self,
        denoiser: DiscreteDenoiser,
        network: Network,
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor] | None,
    ) -> Denoise:
        if self.scale == 1.0:
            return NoGuidance()(denoiser, network, cond)
        if uncond is None:
            raise ValueError(
                f"classifier-free guidance at scale {self.scale} needs unconditional embeddings; "
                "pass uncond, or use guidance scale 1.0 (NoGuidance)"
            )
        if set(cond) != set(uncond):
            raise ValueError(
                f"cond and uncond must hold the same keys, got {sorted(cond)} and {sorted(uncond)}; "
                "build both with the same conditioner"
            )
        both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
        scale = self.scale

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            d_uncond, d_cond = denoiser(network, torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            return d_uncond + scale * (d_cond - d_uncond)

        return denoise


def guidance_for_scale(scale: float) -> NoGuidance | ClassifierFreeGuidance:
    """NoGuidance at scale 1, classifier-free guidance otherwise."""
    return NoGuidance() if scale == 1.0 else ClassifierFreeGuidance(scale)

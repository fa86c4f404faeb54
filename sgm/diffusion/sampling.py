"""One call from conditioning to latents: guidance + sampler + (optional) img2img or early stop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sgm.diffusion.common import randn
from sgm.diffusion.denoiser import DiscreteDenoiser, Network
from sgm.diffusion.guidance import guidance_for_scale
from sgm.diffusion.img2img import denoising_end_sigmas, img2img_sigmas, noise_latents
from sgm.diffusion.samplers import Sampler


@torch.no_grad()
def sample(
    network: Network,
    denoiser: DiscreteDenoiser,
    cond: Mapping[str, Tensor],
    uncond: Mapping[str, Tensor] | None,
    shape: Sequence[int],
    sampler: Sampler,
    guidance_scale: float = 5.0,
    generator: torch.Generator | None = None,
    init_latents: Tensor | None = None,
    strength: float | None = None,
    add_noise: bool = True,
    refiner_strength: float | None = None,
) -> Tensor:
    """Sample latents of `shape` on the denoiser's device.

    txt2img by default. With `init_latents` and `strength`, img2img: the latents are noised to the
    start of the schedule's tail (`add_noise=False` when they already are, e.g. a base model's
    handoff) and integrated to 0. With `refiner_strength`, a txt2img run stops early, at the sigma
    where a refiner of that strength starts, and returns the latents still noisy at that level.
    """
    device = denoiser.sigmas.device
    denoise = guidance_for_scale(guidance_scale)(denoiser, network, cond, uncond)
    sigmas = sampler.schedule()
    if init_latents is None:
        if strength is not None:
            raise ValueError("strength is an img2img setting: pass init_latents too, or leave strength unset")
        if refiner_strength is not None:
            sigmas = denoising_end_sigmas(sigmas, refiner_strength)
        return sampler(denoise, randn(shape, generator, device), sigmas, generator)
    if strength is None:
        raise ValueError("img2img needs a strength in [0, 1] (fraction of the schedule to run); pass strength")
    if refiner_strength is not None:
        raise ValueError("refiner_strength (stop early for a refiner) applies to txt2img only; drop init_latents")
    if tuple(init_latents.shape) != tuple(shape):
        raise ValueError(f"init_latents have shape {tuple(init_latents.shape)} but shape {tuple(shape)} was asked for")
    sigmas = img2img_sigmas(sigmas, strength)
    x = init_latents.to(device=device, dtype=torch.float32)
    if add_noise:
        x = noise_latents(x, randn(shape, generator, device), sigmas[0])
    return sampler.integrate(denoise, x, sigmas, generator)

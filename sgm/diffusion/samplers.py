"""Samplers in EDM form: integrate x from sigmas[0] down the schedule with a denoise(x, sigma) callable.

`denoise(x, sigma[B]) -> D` is the (guided) denoised estimate; the samplers know nothing of the
network, the conditioning or the prediction type. A txt2img run starts from
x = noise * sqrt(1 + sigma_max^2), the DDPM-consistent scale of pure noise in the sigma form
(SDXL's reference behaviour). `integrate` starts from an x already at sigmas[0] (img2img, or the
refiner continuing the base's latents) and stops at sigmas[-1], which need not be 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sgm.diffusion.common import randn
from sgm.diffusion.discretization import sampling_sigmas

Denoise = Callable[[Tensor, Tensor], Tensor]


class Sampler:
    """Schedule and txt2img entry point shared by the samplers."""

    def __init__(self, num_steps: int = 50, sigmas_table: Tensor | None = None) -> None:
        self.num_steps = num_steps
        self.sigmas_table = sigmas_table
        self.schedule()  # fail early on an impossible step count

    def schedule(self) -> Tensor:
        """Descending sigmas of this sampler's n-step schedule, 0 appended."""
        return sampling_sigmas(self.num_steps, self.sigmas_table)

    def __call__(
        self,
        denoise: Denoise,
        noise: Tensor,
        sigmas: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample from pure noise N(0, 1): scale it to sigmas[0] and integrate the schedule."""
        sigmas = self.schedule() if sigmas is None else sigmas
        x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
        return self.integrate(denoise, x, sigmas, generator)

    def integrate(
        self, denoise: Denoise, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Run from x, already at noise level sigmas[0], down to sigmas[-1]."""
        raise NotImplementedError


def _sigma_batch(sigma: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


class EulerEDMSampler(Sampler):
    """Euler steps on the probability-flow ODE, with optional EDM "churn" (Karras et al. 2022, alg. 2).

    Where s_tmin <= sigma <= s_tmax, churn raises sigma to sigma_hat = sigma (1 + gamma),
    gamma = min(s_churn / num_steps, sqrt(2) - 1), by adding fresh noise first. s_churn=0 is the
    deterministic sampler SDXL's demo uses.
    """

    def __init__(
        self,
        num_steps: int = 50,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = 999.0,
        s_noise: float = 1.0,
        sigmas_table: Tensor | None = None,
    ) -> None:
        super().__init__(num_steps, sigmas_table)
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise

    def integrate(
        self, denoise: Denoise, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Run from x at sigmas[0] to sigmas[-1]."""
        levels = [float(s) for s in sigmas]
        num_steps = len(levels) - 1
        for sigma, sigma_next in zip(levels[:-1], levels[1:]):
            gamma = min(self.s_churn / num_steps, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
            sigma_hat = sigma * (1.0 + gamma)
            if gamma > 0:
                eps = randn(x.shape, generator, x.device, x.dtype) * self.s_noise
                x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
            denoised = denoise(x, _sigma_batch(sigma_hat, x))
            x = x + (sigma_next - sigma_hat) * (x - denoised) / sigma_hat
        return x


class DPMPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in t = -log sigma.

    Each step is x' = (sigma'/sigma) x - expm1(-h) D_hat with h = t' - t. D_hat is the current
    denoised estimate, extrapolated with the previous one, (1 + 1/2r) D - 1/2r D_prev with
    r = h_prev / h, except on the first step and on a step to sigma 0, which are first order
    (a step to 0 returns D itself).
    """

    def integrate(
        self, denoise: Denoise, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Run from x at sigmas[0] to sigmas[-1] (deterministic; the generator is unused)."""
        levels = [float(s) for s in sigmas]
        previous_denoised, h_previous = None, None
        for sigma, sigma_next in zip(levels[:-1], levels[1:]):
            denoised = denoise(x, _sigma_batch(sigma, x))
            if sigma_next == 0.0:
                x = denoised
                continue
            h = math.log(sigma) - math.log(sigma_next)
            estimate = denoised
            if previous_denoised is not None:
                half_inv_r = h / (2.0 * h_previous)
                estimate = (1.0 + half_inv_r) * denoised - half_inv_r * previous_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
            previous_denoised, h_previous = denoised, h
        return x

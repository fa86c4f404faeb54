"""img2img (SDEdit) and the base -> refiner handoff, as cuts of the descending sampling schedule.

`strength` is the fraction of the schedule (its n + 1 sigmas, 0 included) that img2img runs:
it keeps the last max(int(strength * (n + 1)), 1) sigmas, exactly as the reference
Img2ImgDiscretizationWrapper does. For 50 steps and strength 0.15 that is 7 sigmas, from
sigma(t=119) = 0.3866 down to 0: 6 steps. The base model of a base + refiner pipeline stops where
that run starts (the reference Txt2NoisyDiscretizationWrapper): its first 45 sigmas, 44 steps,
ending at 0.3866 with latents still noisy at that level, which the refiner continues without
adding noise.

Noising: the reference img2img helper starts from z + noise * sigma_start, with no
sqrt(1 + sigma^2) factor (it divides by that factor and the sampler multiplies it back), unlike
txt2img's pure-noise start. `noise_latents` does the same.
"""

from __future__ import annotations

from torch import Tensor


def _kept(num_sigmas: int, strength: float) -> int:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img strength must be in [0, 1] (fraction of the schedule to run), got {strength}")
    return max(int(strength * num_sigmas), 1)


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a descending schedule that an img2img run of this strength integrates."""
    return sigmas[len(sigmas) - _kept(len(sigmas), strength) :]


def denoising_end_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The head of a descending schedule that ends where `img2img_sigmas(sigmas, strength)` starts."""
    return sigmas[: len(sigmas) - _kept(len(sigmas), strength) + 1]


def noise_latents(latents: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """SDEdit start: clean latents noised to `sigma` in the sigma form, z + sigma * noise."""
    return latents + noise * float(sigma)

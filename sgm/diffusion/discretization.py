"""The discrete noise schedule: SDXL's 1000-step "scaled linear" DDPM table in sigma form.

A DDPM state z_t = sqrt(abar) x0 + sqrt(1 - abar) eps is, divided by sqrt(abar), the sigma-form
state x = x0 + sigma eps with sigma = sqrt((1 - abar) / abar). Samplers and the loss work in the
sigma form; the network sees z_t again through the denoiser's c_in.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def legacy_ddpm_sigmas(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> Tensor:
    """Ascending float32 sigma_t for t = 0..num_timesteps-1 (betas built and accumulated in float64)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return torch.from_numpy(np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)).float()


def sampling_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Ascending integer t of an n-step schedule: linspace(T-1, 0, n, endpoint=False) floored, reversed.

    For 50 of 1000 steps this is 19, 39, ..., 979, 999 (the top of the table is always included).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}] for a {num_timesteps}-step table, got {num_steps}")
    return np.linspace(num_timesteps - 1, 0, num_steps, endpoint=False).astype(int)[::-1].copy()


def sampling_sigmas(num_steps: int, sigmas_table: Tensor | None = None) -> Tensor:
    """Descending sigmas of the n-step inference schedule with 0 appended (num_steps + 1 values)."""
    table = legacy_ddpm_sigmas() if sigmas_table is None else sigmas_table.detach().float().cpu()
    steps = torch.from_numpy(sampling_timesteps(num_steps, len(table)))
    return torch.cat([table[steps].flip(0), table.new_zeros(1)])

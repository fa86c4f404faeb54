"""Loss weightings w(sigma) on the squared error of the denoised estimate, ||D(x) - x0||^2.

The error in x0 space relates to the network's own error by the scaling: for eps-prediction
||D - x0||^2 = sigma^2 ||eps_hat - eps||^2, for v-prediction ||D - x0||^2 = sigma^2 / (1 + sigma^2)
||v_hat - v||^2. So EpsWeighting gives the plain eps-MSE and VWeighting the plain v-MSE.
"""

from __future__ import annotations

import torch
from torch import Tensor


class EpsWeighting:
    """sigma^-2: the x0-space loss equals the eps-MSE (SDXL's training loss)."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return sigma**-2.0


class VWeighting:
    """(1 + sigma^2) / sigma^2: the x0-space loss equals the v-MSE."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + 1.0) / sigma**2


class UnitWeighting:
    """1: the plain x0-space MSE."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)


class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al. 2023) with SNR = 1 / sigma^2: w = min(SNR, gamma) on the x0 error.

    That is min(SNR, gamma) / SNR times the eps-MSE for eps-prediction and min(SNR, gamma) / (SNR + 1)
    times the v-MSE for v-prediction: the same x0-space weight, so it needs no prediction type.
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"MinSNRWeighting gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, sigma: Tensor) -> Tensor:
        return (sigma**-2.0).clamp(max=self.gamma)

"""The denoiser D(x, sigma): wraps a network so it returns the clean-latent estimate.

D(x) = c_skip x + c_out F(c_in x, c_noise). c_in = 1 / sqrt(1 + sigma^2) turns the sigma-form state
back into the DDPM state the network was trained on; c_noise is the integer DDPM timestep.
The scaling decides what F predicts (eps or v); everything downstream (loss, samplers) only
sees D, so prediction type is swapped here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from sgm.diffusion.common import append_dims, per_sample_sigma
from sgm.diffusion.discretization import legacy_ddpm_sigmas
from sgm.models.conditioner import CROSSATTN, VECTOR

Network = Callable[..., Tensor]


class EpsScaling:
    """eps-prediction (SDXL): D = x - sigma * eps_theta."""

    prediction = "eps"

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for each sigma."""
        return torch.ones_like(sigma), -sigma, 1.0 / (sigma**2 + 1.0).sqrt()


class VScaling:
    """v-prediction (SD 2 style, v = alpha eps - s x0 in the DDPM state): D = x / (1+s^2) - s v / sqrt(1+s^2)."""

    prediction = "v"

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for each sigma."""
        norm = (sigma**2 + 1.0).sqrt()
        return 1.0 / (sigma**2 + 1.0), -sigma / norm, 1.0 / norm


class DiscreteDenoiser(nn.Module):
    """D(x, sigma) for a network trained on the discrete 1000-step table.

    With `quantize` (the SDXL behaviour) sigma snaps to the nearest table entry and the network gets
    its integer index. Without it sigma is used as given and the network gets a fractional index,
    interpolated in log sigma between the two neighbouring entries.
    The table is the buffer `sigmas`, the name official checkpoints use (`denoiser.sigmas`).
    """

    def __init__(
        self,
        scaling: EpsScaling | VScaling | Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
        num_timesteps: int = 1000,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        self.scaling = scaling
        self.quantize = quantize
        self.register_buffer("sigmas", legacy_ddpm_sigmas(num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def sigma_to_idx(self, sigma: Tensor) -> Tensor:
        """Index of the nearest table entry, same shape as sigma."""
        sigma = torch.as_tensor(sigma, device=self.sigmas.device, dtype=self.sigmas.dtype)
        dists = (sigma.reshape(1, -1) - self.sigmas[:, None]).abs()
        return dists.argmin(dim=0).reshape(sigma.shape)

    def idx_to_sigma(self, idx: Tensor) -> Tensor:
        """Table sigma for integer indices."""
        return self.sigmas[torch.as_tensor(idx, device=self.sigmas.device, dtype=torch.long)]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep: linear interpolation of the index in log sigma, clamped to the table."""
        log_table = self.sigmas.log()
        log_sigma = torch.as_tensor(sigma, device=self.sigmas.device, dtype=self.sigmas.dtype).log()
        log_sigma = log_sigma.clamp(log_table[0], log_table[-1])
        high = torch.searchsorted(log_table, log_sigma.contiguous()).clamp(1, self.num_timesteps - 1)
        low = high - 1
        frac = (log_sigma - log_table[low]) / (log_table[high] - log_table[low])
        return low.to(log_sigma.dtype) + frac

    def forward(self, network: Network, x: Tensor, sigma: Tensor | float, cond: Mapping[str, Tensor]) -> Tensor:
        """The denoised estimate of x0 for x = x0 + sigma * noise; `sigma` is a scalar or [B]."""
        sigma = per_sample_sigma(sigma, x.shape[0], x.device)
        if self.quantize:
            c_noise = self.sigma_to_idx(sigma).to(x.device)
            sigma = self.idx_to_sigma(c_noise).to(x.device)
        else:
            c_noise = self.sigma_to_t(sigma).to(x.device)
        c_skip, c_out, c_in = (append_dims(c, x.ndim).to(x.dtype) for c in self.scaling(sigma))
        output = network(x * c_in, c_noise, context=cond.get(CROSSATTN), y=cond.get(VECTOR))
        return output * c_out + x * c_skip

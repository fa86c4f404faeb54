"""Training noise levels: which sigmas the loss sees.

SDXL base draws t uniformly from all 1000 discrete steps. The refiner is trained only on the 200
lowest-noise steps, t in [0, 199]: a truncation of the table (t_max=199), not a re-spacing of the
whole range over 200 entries as the official DiscreteSampling(num_idx=200) would do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sgm.diffusion.discretization import legacy_ddpm_sigmas


class DiscreteTimestepSampler:
    """Uniform integer t in [t_min, t_max] (inclusive) and the table sigma of each."""

    def __init__(self, num_timesteps: int = 1000, t_min: int = 0, t_max: int | None = None) -> None:
        t_max = num_timesteps - 1 if t_max is None else t_max
        if not 0 <= t_min <= t_max < num_timesteps:
            raise ValueError(
                f"need 0 <= t_min <= t_max < num_timesteps, got t_min={t_min}, t_max={t_max}, "
                f"num_timesteps={num_timesteps}; e.g. t_max=199 trains a refiner on the 200 lowest-noise steps"
            )
        self.t_min = t_min
        self.t_max = t_max
        self.sigmas = legacy_ddpm_sigmas(num_timesteps)

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(sigmas [B] float32, timestep indices [B] int64), both on `device`."""
        source = generator.device if generator is not None else "cpu"
        idx = torch.randint(self.t_min, self.t_max + 1, (batch_size,), generator=generator, device=source).cpu()
        return self.sigmas[idx].to(device), idx.to(device)

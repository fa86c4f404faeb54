"""Small tensor helpers shared by the diffusion pieces."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append singleton dims so a per-sample [B] tensor broadcasts against [B, C, H, W]."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x.reshape(*x.shape, *([1] * missing))


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to `device`.

    Drawing where the generator lives keeps a seeded run identical whichever device computes it.
    """
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def per_sample_sigma(sigma: Tensor | float, batch_size: int, device: torch.device) -> Tensor:
    """A float32 [B] sigma from a scalar, a [1] or a [B] tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0 or sigma.numel() == 1:
        return sigma.reshape(1).expand(batch_size)
    if sigma.shape != (batch_size,):
        raise ValueError(f"sigma must be a scalar or have shape [{batch_size}], got {tuple(sigma.shape)}")
    return sigma

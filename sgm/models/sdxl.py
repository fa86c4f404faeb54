"""The SDXL model: conditioner, UNet and VAE, the three parts of an official checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sgm.models.conditioner import CROSSATTN, VECTOR, Conditioner

SDXL_LATENT_SCALE = 0.13025


class SDXL(nn.Module):
    """Holds the trainable UNet and the frozen conditioner and VAE; knows the latent scale.

    Plain PyTorch: no knowledge of Lightning, of the data source or of the diffusion schedule.
    """

    def __init__(
        self,
        unet: nn.Module,
        conditioner: Conditioner,
        vae: nn.Module,
        scale_factor: float = SDXL_LATENT_SCALE,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.vae = vae
        self.scale_factor = float(scale_factor)
        self._check_conditioning_dims()

    def _check_conditioning_dims(self) -> None:
        dims = self.conditioner.output_dims
        expected = {
            CROSSATTN: getattr(self.unet, "context_dim", None),
            VECTOR: getattr(self.unet, "adm_in_channels", None),
        }
        for key, want in expected.items():
            if want is not None and dims[key] != want:
                raise ValueError(
                    f"the conditioner produces {key} of {dims[key]} channels but the UNet expects {want}; "
                    "make the UNet's context_dim / adm_in_channels equal the sum of the embedders' outputs"
                )

    def freeze_frozen_parts(self) -> None:
        """Put the conditioner and VAE in eval mode without grads (they never train here)."""
        for part in (self.conditioner, self.vae):
            part.eval()
            part.requires_grad_(False)

    def encode_first_stage(
        self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images in [-1, 1] -> scaled latents (posterior sample, or its mean with sample=False)."""
        posterior = self.vae.encode(images)
        latents = posterior.sample(generator=generator) if sample else posterior.mode()
        return latents * self.scale_factor

    def decode_first_stage(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in about [-1, 1]."""
        return self.vae.decode(latents / self.scale_factor)

    def condition(self, batch: Mapping[str, Any], **kwargs: Any) -> dict[str, Tensor]:
        """Run the conditioner (see Conditioner.forward for dropout and zeroing options)."""
        return self.conditioner(batch, **kwargs)

    def forward(self, x: Tensor, timesteps: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The denoising network call: UNet(x, t, context, y)."""
        return self.unet(x, timesteps, context=cond[CROSSATTN], y=cond[VECTOR])

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component, in the official checkpoint's grouping."""
        counts = {"unet": _numel(self.unet.parameters()), "vae": _numel(self.vae.parameters())}
        for index, module in enumerate(self.conditioner.embedders):
            counts[f"conditioner.embedders.{index} ({type(module).__name__})"] = _numel(module.parameters())
        return counts


def _numel(params: Sequence[nn.Parameter] | Any) -> int:
    return sum(p.numel() for p in params)

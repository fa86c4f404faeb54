"""SDXL's VAE (AutoencoderKL, f = 8) and its diagonal Gaussian posterior.

The state dict equals the official `first_stage_model.*` keys with the prefix stripped. The VAE
refuses float16: its activations overflow there (the known SDXL VAE NaN/black-image problem). It
runs with autocast disabled, in the dtype of its parameters (float32 or bfloat16), like the
reference's disable_first_stage_autocast. Latents here are unscaled: the caller multiplies by
the scale factor (0.13025 for SDXL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from sgm.models.autoencoder_blocks import Decoder, Encoder, conv1x1

_FP16_MESSAGE = "the SDXL VAE overflows in fp16; keep it in float32 or bfloat16"


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2C, h, w]; logvar clamped to [-30, 20]."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise; noise is drawn on the generator's device, so a CPU generator works with CUDA."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        """The posterior mean (deterministic latents)."""
        return self.mean


@contextlib.contextmanager
def _autocast_disabled(device: torch.device) -> Iterator[None]:
    """Disable autocast on `device` (a no-op on devices without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] (BCHW) <-> unscaled latents [B, embed_dim, H/f, W/f], f = 2**(len(ch_mult)-1).

    Defaults are SDXL's VAE: 83,653,863 parameters (encoder 34,163,592, decoder 49,490,179).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int = 4,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        if not ch_mult:
            raise ValueError("ch_mult needs at least one level, e.g. (1, 2, 4, 4) for SDXL")
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.downsampling_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, norm_num_groups)
        self.decoder = Decoder(out_channels, ch, ch_mult, num_res_blocks, z_channels, norm_num_groups)
        self.quant_conv = conv1x1(2 * z_channels, 2 * embed_dim)
        self.post_quant_conv = conv1x1(embed_dim, z_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images [B, in_channels, H, W] in [-1, 1] -> posterior over unscaled latents."""
        f = self.downsampling_factor
        if images.ndim != 4 or images.shape[1] != self.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"VAE.encode expects images [B, {self.in_channels}, H, W] with H and W multiples of {f}; "
                f"got shape {list(images.shape)}"
            )
        x = self._prepare(images, "images")
        with _autocast_disabled(x.device):
            return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images [B, out_channels, h*f, w*f] (about [-1, 1])."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"VAE.decode expects unscaled latents [B, {self.embed_dim}, h, w]; got shape {list(z.shape)}"
            )
        x = self._prepare(z, "latents")
        with _autocast_disabled(x.device):
            return self.decoder(self.post_quant_conv(x))

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction through the posterior mean (a convenience; training uses encode/decode)."""
        return self.decode(self.encode(images).mode())

    def _prepare(self, x: Tensor, what: str) -> Tensor:
        """Refuse float16 weights; cast the input (float16 too, e.g. from an fp16 UNet) to the VAE's dtype."""
        if self.dtype == torch.float16:
            raise ValueError(
                f"{_FP16_MESSAGE}: the VAE's parameters are float16 (call vae.float() or vae.bfloat16()); "
                f"refusing to run it on {what}"
            )
        return x.to(self.dtype)

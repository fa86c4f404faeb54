"""Our UNet equals diffusers' UNet2DConditionModel loaded from the same official-layout weights.

diffusers is a test-only numerical reference: its single-file converter maps the official
(`model.diffusion_model.*`) keys to its own model, so agreement checks both our key layout and our
math (time/label embedding, ResBlocks, transformers, skips, up/down sampling) at once.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import randomize_
from test_unet import tiny_unet_config

from sgm.benchmarks.unet_train_step import diffusers_unet_config
from sgm.models.unet import UNetModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402


def fourier_256(values: torch.Tensor) -> torch.Tensor:
    """[B, K] scalars -> [B, K*256]: each v -> [cos(v f) | sin(v f)], f_i = exp(-ln(1e4) i / 128) (spec section 2)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = values.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).flatten(1)


@pytest.mark.parametrize("shape, num_time_ids", [("base", 6), ("refiner", 5)])
def test_matches_diffusers_from_official_layout(shape, num_time_ids):
    torch.manual_seed(0)
    cfg = tiny_unet_config(shape)
    ours = randomize_(UNetModel(**cfg), seed=1, std=0.05).eval()  # zero-init layers get weights too

    config = diffusers_unet_config(cfg)
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    reference.load_state_dict(converted, strict=True)
    assert len(converted) == len(checkpoint)  # every official tensor found a home

    gen = torch.Generator().manual_seed(2)
    batch, pooled_dim = 2, cfg["adm_in_channels"] - 256 * num_time_ids
    x = torch.randn(batch, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([17, 941])
    context = torch.randn(batch, 77, cfg["context_dim"], generator=gen)
    pooled = torch.randn(batch, pooled_dim, generator=gen)
    # (orig h, orig w, crop top, crop left, target h, target w) for base; the refiner ends in the aesthetic score.
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 64.0, 1024.0, 1024.0], [512.0, 512.0, 32.0, 0.0, 6.0, 6.0]])
    time_ids = time_ids[:, :num_time_ids]
    y = torch.cat([pooled, fourier_256(time_ids)], dim=1)

    with torch.no_grad():
        got = ours(x, timesteps, context, y)
        other_timesteps = ours(x, timesteps.flip(0), context, y)
        want = reference(
            x, timesteps, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    scale = want.abs().max().item()
    assert scale > 0.05  # the randomized model produces a real signal
    print(f"max |ours - diffusers| = {(got - want).abs().max().item():.3g}, output scale {scale:.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * scale)
    assert (other_timesteps - want).abs().max() > 1e-3 * scale  # the comparison is sensitive enough to matter

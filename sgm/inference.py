"""Text-to-image (and image-to-image) generation with an SDXL model: conditioning, sampling, decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling
from sgm.diffusion.samplers import DPMPP2MSampler
from sgm.diffusion.sampling import sample
from sgm.models.sdxl import SDXL


def micro_conditioning_batch(
    prompts: Sequence[str],
    height: int,
    width: int,
    input_keys: Sequence[str],
    original_size: tuple[int, int] | None = None,
    crop_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    aesthetic_score: float = 6.0,
) -> dict:
    """The conditioning batch for inference; sizes default to the output size (h, w), crop to (0, 0)."""
    n = len(prompts)
    values = {
        "txt": list(prompts),
        "original_size_as_tuple": original_size or (height, width),
        "crop_coords_top_left": crop_coords_top_left,
        "target_size_as_tuple": target_size or (height, width),
        "aesthetic_score": (aesthetic_score,),
    }
    batch = {}
    for key in input_keys:
        value = values[key]
        batch[key] = value if key == "txt" else torch.tensor([list(value)] * n, dtype=torch.float32)
    return batch


@torch.no_grad()
def generate_latents(
    model: SDXL,
    prompts: Sequence[str],
    height: int,
    width: int,
    negative_prompts: Sequence[str] | None = None,
    sampler=None,
    denoiser: DiscreteDenoiser | None = None,
    guidance_scale: float = 5.0,
    seed: int = 0,
    init_latents: Tensor | None = None,
    strength: float | None = None,
    add_noise: bool = True,
    refiner_strength: float | None = None,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    **micro: tuple[int, int],
) -> Tensor:
    """Sample scaled latents for the prompts.

    The unconditional branch follows the reference: a model with target-size conditioning (base)
    zeroes its text embeddings; one with aesthetic-score conditioning (refiner) encodes the
    negative prompt with the negative aesthetic score. `refiner_strength` stops a base run where a
    refiner of that strength takes over; pass its output to the refiner as `init_latents` with the
    same `strength` and `add_noise=False` (the paper's two-stage pipeline).
    """
    keys = model.conditioner.input_keys
    device = next(model.unet.parameters()).device
    sampler = sampler or DPMPP2MSampler(num_steps=30)
    denoiser = (denoiser or DiscreteDenoiser(EpsScaling())).to(device)
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    batch = micro_conditioning_batch(prompts, height, width, keys, aesthetic_score=aesthetic_score, **micro)
    uc_batch = micro_conditioning_batch(negatives, height, width, keys, aesthetic_score=negative_aesthetic_score, **micro)
    is_refiner = "aesthetic_score" in keys
    cond = _to(model.conditioner(batch), device)
    uncond = _to(model.conditioner(uc_batch, zero_keys=() if is_refiner else ("txt",)), device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    factor = model.vae.downsampling_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of the VAE factor {factor}, got {height}x{width}")
    shape = (len(prompts), model.unet.in_channels, height // factor, width // factor)
    return sample(
        model.unet,
        denoiser,
        cond,
        uncond,
        shape,
        sampler,
        guidance_scale,
        generator,
        init_latents=init_latents,
        strength=strength,
        add_noise=add_noise,
        refiner_strength=refiner_strength,
    )


def latents_to_uint8(model: SDXL, latents: Tensor) -> Tensor:
    """Decode scaled latents into uint8 images [B, H, W, 3]."""
    with torch.no_grad():
        images = model.decode_first_stage(latents.to(next(model.vae.parameters()).dtype))
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu()


def _to(cond: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in cond.items()}


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """uint8 [B, H, W, 3] -> one PIL grid image, row-major."""
    count, height, width, _ = images.shape
    rows = (count + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images.numpy()):
        grid.paste(Image.fromarray(image), ((index % columns) * width, (index // columns) * height))
    return grid

"""Text-to-image (and image-to-image) generation with an SDXL model: conditioning, sampling, decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from sgm.diffusion.common import randn
from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling
from sgm.diffusion.samplers import Denoise, DPMPP2MSampler, Sampler
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
    seed: int | Sequence[int] = 0,
    init_latents: Tensor | None = None,
    strength: float | None = None,
    add_noise: bool = True,
    refiner_strength: float | None = None,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    zero_uncond_text: bool | None = None,
    **micro: tuple[int, int],
) -> Tensor:
    """Sample scaled latents for the prompts.

    The unconditional branch follows the reference: a model with target-size conditioning (base)
    zeroes its text embeddings unless a negative prompt is given (then it is encoded, as diffusers'
    force_zeros_for_empty_prompt does); one with aesthetic-score conditioning (refiner) encodes the
    negative prompt with the negative aesthetic score; a model whose conditioner has caption_dropout_rate > 0
    learned the empty caption, not zeroed embeddings, and is guided against "". `zero_uncond_text` overrides
    that choice: False encodes the negative prompts even when empty, True zeroes them. `refiner_strength`
    stops a base run where a refiner of that strength takes over; pass its output to the refiner as
    `init_latents` with the same `strength` and `add_noise=False` (the paper's two-stage pipeline).
    `seed` as a sequence gives one seed per prompt: each image's starting noise then depends on its
    own seed only, so an image is the same whatever batch it is sampled in.
    """
    keys = model.conditioner.input_keys
    device = next(model.unet.parameters()).device
    sampler = sampler or DPMPP2MSampler(num_steps=30)
    denoiser = (denoiser or DiscreteDenoiser(EpsScaling())).to(device)
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    batch = micro_conditioning_batch(prompts, height, width, keys, aesthetic_score=aesthetic_score, **micro)
    uc_batch = micro_conditioning_batch(
        negatives, height, width, keys, aesthetic_score=negative_aesthetic_score, **micro
    )
    # the size/crop/score tensors go where the conditioner runs (its text outputs are concatenated with theirs)
    cond_device = next((p.device for p in model.conditioner.parameters()), device)
    batch, uc_batch = (_to(b, cond_device) for b in (batch, uc_batch))
    is_refiner = "aesthetic_score" in keys
    cond = _to(model.conditioner(batch), device)
    learned_empty = model.conditioner.caption_dropout_rate > 0  # trained on "" captions: guide against ""
    zero_text = not (is_refiner or any(negatives) or learned_empty) if zero_uncond_text is None else zero_uncond_text
    uncond = _to(model.conditioner(uc_batch, zero_keys=("txt",) if zero_text else ()), device)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    generator = torch.Generator(device="cpu").manual_seed(seeds[0])
    factor = model.vae.downsampling_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of the VAE factor {factor}, got {height}x{width}")
    shape = (len(prompts), model.unet.in_channels, height // factor, width // factor)
    if not isinstance(seed, int):
        if len(seeds) != len(prompts) or (init_latents is not None and add_noise):
            raise ValueError(
                f"per-image seeds need one seed per prompt ({len(seeds)} for {len(prompts)}) and set txt2img "
                "noise only; pass one int seed for img2img with add_noise"
            )
        noise = torch.cat([randn((1, *shape[1:]), torch.Generator(device="cpu").manual_seed(s)) for s in seeds])
        sampler = _StartingNoise(sampler, noise)
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


class _StartingNoise(Sampler):
    """A sampler that starts txt2img from the given noise instead of the batch draw (per-image seeds)."""

    def __init__(self, sampler: Sampler, noise: Tensor) -> None:
        self.sampler, self.noise, self.num_steps = sampler, noise, sampler.num_steps

    def schedule(self) -> Tensor:
        return self.sampler.schedule()

    def __call__(self, denoise: Denoise, noise: Tensor, sigmas: Tensor | None = None, generator=None) -> Tensor:
        return self.sampler(denoise, self.noise.to(noise.device, noise.dtype), sigmas, generator)

    def integrate(self, denoise: Denoise, x: Tensor, sigmas: Tensor, generator=None) -> Tensor:
        return self.sampler.integrate(denoise, x, sigmas, generator)


def latents_to_uint8(model: SDXL, latents: Tensor) -> Tensor:
    """Decode scaled latents into uint8 images [B, H, W, 3]."""
    with torch.no_grad():
        vae_weight = next(model.vae.parameters())  # the VAE may live on another device (offloaded)
        images = model.decode_first_stage(latents.to(vae_weight.device, vae_weight.dtype))
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu()


def _to(cond: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cond.items()}


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """uint8 [B, H, W, 3] -> one PIL grid image, row-major."""
    count, height, width, _ = images.shape
    rows = (count + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images.numpy()):
        grid.paste(Image.fromarray(image), ((index % columns) * width, (index // columns) * height))
    return grid

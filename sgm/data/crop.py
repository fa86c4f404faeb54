"""Resize an image to cover its bucket, crop, maybe flip, and record SDXL's micro-conditioning.

SDXL conditions on three numbers per sample so that it learns what resizing and cropping did
instead of imitating their artefacts:
- `original_size_as_tuple` (h, w): the image before any resize (post-EXIF, see decode.py);
  small images are upscaled to cover the bucket and the small size is recorded;
- `crop_coords_top_left` (top, left): where the crop starts in the resized image;
- `target_size_as_tuple` (h, w): the bucket.

Resize: scale = max(th / h, tw / w), so the image covers the bucket; the other side is rounded
up (computed exactly in integers), so it is never smaller than the bucket. Resampling defaults to
BICUBIC: Pillow's bicubic is antialiased when downscaling, rings less than LANCZOS when
upscaling, and measured ~30% faster than LANCZOS on 3000x2000 -> 1536x1024.

Flip: the crop is mirrored horizontally and its left coordinate is mirrored with it,
left' = resized_w - left - target_w, so the recorded crop describes the image the model actually
saw (the mirrored resized image, cropped at (top, left')). top is unchanged.

Draft-decoded input (decode.py's `decode_image_draft`): the image is 1/draft_scale of `full_size`.
Every size and crop is computed from `full_size` exactly as for the full decode, so the recorded
numbers are the same for the same rng draw; only the resize reads the smaller image, through a box
that maps it onto the full image's geometry (draft pixel i covers full pixels [i*s, (i+1)*s)).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Rng = random.Random | np.random.Generator
CROP_MODES = ("random", "center")


@dataclass(frozen=True)
class CroppedSample:
    """One training image at bucket size with the SDXL micro-conditioning that describes it."""

    pixels: torch.Tensor  # uint8 [3, H, W], H, W = target_size_as_tuple
    original_size_as_tuple: tuple[int, int]  # (h, w)
    crop_coords_top_left: tuple[int, int]  # (top, left) in the resized (and, if flipped, mirrored) image
    target_size_as_tuple: tuple[int, int]  # (h, w)
    flipped: bool


def covering_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(h, w) after scaling by max(th/h, tw/w): one side equals the target, the other is
    ceil-rounded so it is never smaller than the target. Exact integer arithmetic."""
    if min(height, width, target_h, target_w) <= 0:
        raise ValueError(f"sizes must be positive, got image ({height}, {width}), target ({target_h}, {target_w})")
    if target_h * width >= target_w * height:  # th/h >= tw/w: height decides the scale
        return target_h, max(target_w, -(-width * target_h // height))
    return max(target_h, -(-height * target_w // width)), target_w


def resize_and_crop(
    image: Image.Image,
    bucket_hw: tuple[int, int],
    crop: str = "random",
    flip_probability: float = 0.0,
    rng: Rng | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    original_size_as_tuple: tuple[int, int] | None = None,
    full_size: tuple[int, int] | None = None,
    draft_scale: int = 1,
) -> CroppedSample:
    """Resize `image` (RGB) to cover `bucket_hw`, crop to it, flip with `flip_probability`.

    `rng` (random.Random or numpy Generator) is required for a random crop or a flip; the crop
    offset is drawn before the flip. `original_size_as_tuple` overrides the recorded original
    size, for shards that store a downscaled copy next to the true size (img2dataset's json
    `original_height`/`original_width`); by default it is the image's own (h, w).
    `full_size` (h, w) and `draft_scale`: the image was draft-decoded at 1/draft_scale of
    full_size (see the module docstring); sizes, crop and the default recorded size follow full_size.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (the output of decode_image), got mode {image.mode!r}")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must lie in [0, 1], got {flip_probability}")
    if rng is None and (crop == "random" or flip_probability > 0.0):
        raise ValueError("a random crop or flip needs an explicit rng (random.Random or numpy Generator)")
    target_h, target_w = (int(side) for side in bucket_hw)
    height, width = (image.height, image.width) if full_size is None else (int(v) for v in full_size)
    if draft_scale < 1 or image.width * draft_scale < width or image.height * draft_scale < height:
        raise ValueError(f"a {image.size} image cannot be {full_size} at 1/{draft_scale} scale")
    recorded = (height, width) if original_size_as_tuple is None else tuple(int(v) for v in original_size_as_tuple)
    if len(recorded) != 2 or min(recorded) <= 0:
        raise ValueError(f"original_size_as_tuple must be a positive (h, w), got {original_size_as_tuple!r}")
    resized_h, resized_w = covering_size(height, width, target_h, target_w)
    if draft_scale != 1:
        box = (0.0, 0.0, width / draft_scale, height / draft_scale)
        image = image.resize((resized_w, resized_h), resample=resample, box=box)
    elif (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), resample=resample)

    if crop == "center":
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    else:
        top, left = _randint(rng, resized_h - target_h), _randint(rng, resized_w - target_w)
    image = image.crop((left, top, left + target_w, top + target_h))
    flipped = flip_probability > 0.0 and _uniform(rng) < flip_probability
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = resized_w - left - target_w

    # CHW straight from PIL's per-band split: one de-interleaving copy instead of an HWC array plus
    # a strided transpose, ~3x cheaper at 1024^2 (measured; it was ~8% of a 1024 sample's cost).
    pixels = torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))
    return CroppedSample(
        pixels=pixels,
        original_size_as_tuple=recorded,
        crop_coords_top_left=(top, left),
        target_size_as_tuple=(target_h, target_w),
        flipped=flipped,
    )


def _randint(rng: Rng, high: int) -> int:
    """Uniform integer in [0, high], from either kind of rng."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high + 1))
    return rng.randint(0, high)


def _uniform(rng: Rng) -> float:
    return float(rng.random())

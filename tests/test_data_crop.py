"""resize_and_crop: cover the bucket, crop inside the resized image, flip, record SDXL conditioning."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sgm.data.buckets import SDXL_BUCKETS_1024, assign_bucket, bucket_table, square_table
from sgm.data.crop import covering_size, resize_and_crop
from sgm.data.decode import decode_image

SIZES_HW = [(9, 17), (17, 9), (1, 1), (64, 64), (400, 3000), (3000, 400), (333, 517), (1024, 1024), (1536, 2048)]


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def resized_reference(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """The whole resized image, computed independently of resize_and_crop."""
    height, width = image.height, image.width
    scale = max(bucket[0] / height, bucket[1] / width)
    resized_h, resized_w = (
        max(bucket[0], int(np.ceil(height * scale - 1e-9))),
        max(bucket[1], int(np.ceil(width * scale - 1e-9))),
    )
    return np.asarray(image.resize((resized_w, resized_h), Image.Resampling.BICUBIC))


def test_covering_size_is_the_smallest_cover() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        height, width = rng.randint(1, 5000), rng.randint(1, 5000)
        target_h, target_w = rng.choice(list(SDXL_BUCKETS_1024) + [(256, 256), (64, 32)])
        resized_h, resized_w = covering_size(height, width, target_h, target_w)
        assert resized_h >= target_h and resized_w >= target_w
        assert resized_h == target_h or resized_w == target_w  # one side fits exactly
        scale = max(target_h / height, target_w / width)
        # the free side is the exact scaled size rounded up, never down
        assert height * scale <= resized_h + 1e-6 and resized_h - 1 < height * scale + 1e-6
        assert width * scale <= resized_w + 1e-6 and resized_w - 1 < width * scale + 1e-6
    assert covering_size(1000, 1000, 512, 512) == (512, 512)
    assert covering_size(9, 17, 1024, 1024) == (1024, 1935)  # 17 * 1024 / 9 = 1934.2 -> 1935
    with pytest.raises(ValueError):
        covering_size(0, 10, 8, 8)


@pytest.mark.parametrize("height, width", SIZES_HW)
@pytest.mark.parametrize("rng", [random.Random(3), np.random.default_rng(3)], ids=["random", "numpy"])
def test_recorded_conditioning_and_crop_bounds(height: int, width: int, rng) -> None:
    image = noise_image(height, width)
    for table in (list(SDXL_BUCKETS_1024), bucket_table(256), square_table(256)):
        bucket = table[assign_bucket(height, width, table)]
        sample = resize_and_crop(image, bucket, crop="random", flip_probability=0.5, rng=rng)
        assert sample.pixels.dtype == torch.uint8 and sample.pixels.shape == (3, *bucket)
        assert sample.pixels.is_contiguous()
        assert sample.original_size_as_tuple == (height, width)
        assert sample.target_size_as_tuple == bucket
        resized_h, resized_w = covering_size(height, width, *bucket)
        top, left = sample.crop_coords_top_left
        assert 0 <= top <= resized_h - bucket[0] and 0 <= left <= resized_w - bucket[1]


@pytest.mark.parametrize("height, width", [(9, 17), (400, 3000), (3000, 400), (333, 517), (700, 700)])
def test_center_crop_equals_the_region_of_an_independent_resize(height: int, width: int) -> None:
    image = noise_image(height, width, seed=1)
    for bucket in [(1024, 1024), (768, 1344), (1344, 768), (256, 256)]:
        sample = resize_and_crop(image, bucket, crop="center")
        reference = resized_reference(image, bucket)
        top, left = sample.crop_coords_top_left
        assert (top, left) == ((reference.shape[0] - bucket[0]) // 2, (reference.shape[1] - bucket[1]) // 2)
        expected = reference[top : top + bucket[0], left : left + bucket[1]]
        np.testing.assert_array_equal(sample.pixels.permute(1, 2, 0).numpy(), expected)
        assert not sample.flipped


def test_random_crop_equals_the_recorded_region_and_is_seeded() -> None:
    image = noise_image(300, 500, seed=2)
    bucket = (256, 256)
    reference = resized_reference(image, bucket)  # 256 x 427
    lefts = set()
    for seed in range(20):
        sample = resize_and_crop(image, bucket, crop="random", rng=random.Random(seed))
        top, left = sample.crop_coords_top_left
        assert top == 0
        lefts.add(left)
        np.testing.assert_array_equal(sample.pixels.permute(1, 2, 0).numpy(), reference[:, left : left + 256])
        again = resize_and_crop(image, bucket, crop="random", rng=random.Random(seed))
        assert again.crop_coords_top_left == (top, left) and torch.equal(again.pixels, sample.pixels)
    assert len(lefts) > 8 and max(lefts) <= 427 - 256


@pytest.mark.parametrize("rng_type", ["random", "numpy"])
def test_flip_mirrors_pixels_and_the_left_coordinate(rng_type: str) -> None:
    image = noise_image(240, 500, seed=4)
    bucket = (128, 192)
    reference = resized_reference(image, bucket)  # 128 x 267
    resized_w = reference.shape[1]
    make_rng = (lambda s: random.Random(s)) if rng_type == "random" else (lambda s: np.random.default_rng(s))
    for seed in range(10):
        plain = resize_and_crop(image, bucket, crop="random", flip_probability=0.0, rng=make_rng(seed))
        flipped = resize_and_crop(image, bucket, crop="random", flip_probability=1.0, rng=make_rng(seed))
        assert flipped.flipped and not plain.flipped
        top, left = plain.crop_coords_top_left  # the crop is drawn before the flip: same region
        assert flipped.crop_coords_top_left == (top, resized_w - left - bucket[1])
        assert torch.equal(flipped.pixels, plain.pixels.flip(-1))
        # the recorded coordinates describe the mirrored resized image the model saw
        mirrored = reference[:, ::-1]
        new_left = flipped.crop_coords_top_left[1]
        np.testing.assert_array_equal(
            flipped.pixels.permute(1, 2, 0).numpy(), mirrored[top : top + bucket[0], new_left : new_left + bucket[1]]
        )


def test_flip_probability_is_respected() -> None:
    image = noise_image(40, 40)
    rng = np.random.default_rng(7)
    flips = sum(resize_and_crop(image, (32, 32), "center", 0.3, rng).flipped for _ in range(1000))
    assert 240 <= flips <= 360
    center = resize_and_crop(image, (32, 32), "center", 1.0, random.Random(0))
    assert center.crop_coords_top_left == (0, 0) and center.flipped  # symmetric crop stays at left 0


def test_small_images_are_upscaled_and_keep_their_small_original_size() -> None:
    image = noise_image(9, 17)
    sample = resize_and_crop(image, (1024, 1024), crop="center")
    assert sample.original_size_as_tuple == (9, 17)
    assert sample.crop_coords_top_left == (0, (1935 - 1024) // 2)
    assert sample.pixels.shape == (3, 1024, 1024)
    override = resize_and_crop(image, (64, 64), crop="center", original_size_as_tuple=(900, 1700))
    assert override.original_size_as_tuple == (900, 1700)


def test_exif_rotated_jpeg_end_to_end() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    noise_image(300, 800).save(buffer, "JPEG", exif=exif)  # stored 800 wide x 300 high
    image = decode_image(buffer.getvalue())
    table = list(SDXL_BUCKETS_1024)
    bucket = table[assign_bucket(image.height, image.width, table)]
    assert bucket[0] > bucket[1]  # a portrait bucket for the viewer's portrait image
    sample = resize_and_crop(image, bucket, crop="random", flip_probability=0.5, rng=random.Random(1))
    assert sample.original_size_as_tuple == (800, 300)
    assert sample.pixels.shape == (3, *bucket)


def test_invalid_arguments_are_rejected() -> None:
    image = noise_image(20, 20)
    with pytest.raises(ValueError, match="RGB"):
        resize_and_crop(image.convert("L"), (16, 16), crop="center")
    with pytest.raises(ValueError, match="crop must be"):
        resize_and_crop(image, (16, 16), crop="top")
    with pytest.raises(ValueError, match="flip_probability"):
        resize_and_crop(image, (16, 16), crop="center", flip_probability=1.5, rng=random.Random(0))
    with pytest.raises(ValueError, match="explicit rng"):
        resize_and_crop(image, (16, 16), crop="random")
    with pytest.raises(ValueError, match="explicit rng"):
        resize_and_crop(image, (16, 16), crop="center", flip_probability=0.5)
    with pytest.raises(ValueError, match="original_size_as_tuple"):
        resize_and_crop(image, (16, 16), crop="center", original_size_as_tuple=(0, 5))

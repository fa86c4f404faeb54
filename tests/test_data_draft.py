"""Draft decoding: a JPEG at least twice its cover-resize size decodes at 1/2..1/8 scale, records
exactly what the full decode records, and stays within a measured pixel tolerance of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sgm.data.buckets import bucket_table, square_table
from sgm.data.crop import resize_and_crop
from sgm.data.decode import BadSample, decode_image, decode_image_draft
from sgm.data.samples import ImageProcessor
from sgm.data.stream import StreamConfig

# Measured on these photo-like JPEGs (gradients, hard edges, sigma-8 noise, quality 90) at 256 and
# 512, square and multi-aspect: mean |draft - full| 0.82-1.19 levels of 255, max 11-19 (isolated
# noisy pixels at edges; 99.9th percentile 7-10). Bicubic vs Lanczos on the full decode: mean 0.27, max 3.
MEAN_TOLERANCE, MAX_TOLERANCE = 1.5, 24


def photo(height: int, width: int, seed: int = 0, orientation: int | None = None) -> bytes:
    """A photo-like JPEG: smooth gradients, hard edges, noise; optionally an EXIF orientation."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [128 + 100 * np.sin(x / 97 + seed), 128 + 90 * np.cos(y / 131), (x + y) * 200 / (width + height)], -1
    )
    base[(x // 160 + y // 160) % 2 == 0] *= 0.6
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    options = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {
        "landscape": photo(1024, 1536, seed=0),
        "portrait": photo(1536, 1024, seed=1),
        "sideways": photo(1024, 1536, seed=2, orientation=6),  # stored landscape, upright portrait
        "four-three": photo(1024, 1365, seed=3),  # covering 256 needs 342 px wide: ceil(1365 / 4) = 342
    }


def process(data: bytes, table, draft: bool, seed: int = 7):
    processor = ImageProcessor(buckets=tuple(table), flip_probability=0.5, draft_decode=draft)
    raw = {"__key__": "k", "jpg": data, "txt": b"caption"}
    return processor.process(raw, (0, 0, 0), np.random.default_rng(seed))


@pytest.mark.parametrize("name", ["landscape", "portrait", "sideways", "four-three"])
@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.parametrize("layout", ["square", "multi-aspect"])
def test_draft_records_what_the_full_decode_records(photos, name, resolution, layout) -> None:
    table = square_table(resolution) if layout == "square" else bucket_table(resolution)
    for seed in range(3):
        bucket_d, drafted = process(photos[name], table, draft=True, seed=seed)
        bucket_f, full = process(photos[name], table, draft=False, seed=seed)
        assert bucket_d == bucket_f
        a, b = drafted.crop, full.crop
        assert a.original_size_as_tuple == b.original_size_as_tuple
        assert a.crop_coords_top_left == b.crop_coords_top_left
        assert a.target_size_as_tuple == b.target_size_as_tuple
        assert a.flipped == b.flipped
        assert a.pixels.shape == b.pixels.shape and a.pixels.dtype == torch.uint8
        diff = (a.pixels.int() - b.pixels.int()).abs().float()
        assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (diff.mean(), diff.max())
    expected = {"portrait": (1536, 1024), "sideways": (1536, 1024), "four-three": (1024, 1365)}
    assert full.crop.original_size_as_tuple == expected.get(name, (1024, 1536))


@pytest.mark.parametrize(
    "name, need, scale",
    [
        ("landscape", (256, 384), 4),  # 1024x1536 covering a 256 bucket: 4x on both axes
        ("landscape", (512, 768), 2),
        ("landscape", (600, 900), 1),  # 1.7x: not at least twice, full decode
        ("landscape", (128, 192), 8),
        ("sideways", (384, 256), 4),  # upright need, turned to stored orientation for the draft
        ("sideways", (768, 512), 2),
        ("four-three", (256, 342), 4),  # PIL's own rule, 1365 // 342 = 3, would give only 1/2
        ("four-three", (256, 343), 2),
    ],
)
def test_draft_scale_is_the_largest_that_covers_the_need(photos, name, need, scale) -> None:
    decoded = decode_image_draft(photos[name], lambda h, w: need)
    full_h, full_w = decoded.full_size
    assert decoded.draft_scale == scale
    assert (decoded.image.height, decoded.image.width) == (-(-full_h // scale), -(-full_w // scale))
    assert decoded.image.height >= need[0] and decoded.image.width >= need[1]
    assert decoded.quarter_turned == (name == "sideways")
    assert decoded.full_size == decode_image(photos[name]).size[::-1]


def test_the_need_gets_the_upright_full_size(photos) -> None:
    asked = []
    decode_image_draft(photos["sideways"], lambda h, w: asked.append((h, w)))
    assert asked == [(1536, 1024)]


def test_other_formats_and_no_need_decode_fully(photos) -> None:
    image = decode_image(photos["landscape"])
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        decoded = decode_image_draft(buffer.getvalue(), lambda h, w: (128, 192))
        assert decoded.draft_scale == 1 and decoded.image.size == (1536, 1024)
    decoded = decode_image_draft(photos["landscape"], None)
    assert decoded.draft_scale == 1 and np.array_equal(np.asarray(decoded.image), np.asarray(image))


def test_draft_off_is_the_full_decode_path_exactly(photos) -> None:
    _, sample = process(photos["portrait"], square_table(256), draft=False, seed=3)
    expected = resize_and_crop(
        decode_image(photos["portrait"]), (256, 256), flip_probability=0.5, rng=np.random.default_rng(3)
    )
    assert torch.equal(sample.crop.pixels, expected.pixels)
    assert sample.crop.crop_coords_top_left == expected.crop_coords_top_left


def test_draft_keeps_bad_data_classified(photos) -> None:
    with pytest.raises(BadSample) as caught:
        decode_image_draft(photos["landscape"][: len(photos["landscape"]) // 2], lambda h, w: (256, 384))
    assert caught.value.reason == "truncated_image"


def test_resize_and_crop_refuses_an_inconsistent_full_size(photos) -> None:
    image = decode_image(photos["landscape"]).resize((384, 256))
    with pytest.raises(ValueError, match="1/2 scale"):
        resize_and_crop(image, (128, 128), crop="center", full_size=(1024, 1536), draft_scale=2)


def test_draft_decode_is_an_option_outside_the_resume_fingerprint() -> None:
    on = StreamConfig(shards=("a.tar",), buckets=((256, 256),), batch_size=2)
    off = StreamConfig(shards=("a.tar",), buckets=((256, 256),), batch_size=2, draft_decode=False)
    assert on.draft_decode and on.sample_processor().draft_decode
    assert not off.sample_processor().draft_decode
    assert on.fingerprint() == off.fingerprint()

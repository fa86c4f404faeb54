"""decode_image: every pixel mode to exact RGB, EXIF orientation, and typed failures for bad bytes."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgm.data.decode import BAD_SAMPLE_REASONS, BadSample, BadSampleCounter, decode_image

CC12M_SHARD = Path("/work/shared/data/cc12m-train-0000.tar")
BACKGROUNDS = [(255, 255, 255), (12, 34, 56)]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes, extra: bytes = b"") -> bytes:
    """A PNG written by hand, for headers and depths Pillow will not write (bombs, 16-bit RGB, tRNS)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


# ---------------------------------------------------------------- sizes and plain RGB


@pytest.mark.parametrize("height, width", [(9, 17), (17, 9), (1, 1), (64, 64), (400, 3000), (3000, 400), (333, 517)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decoded_size_is_the_stored_size(height: int, width: int, fmt: str) -> None:
    pixels = noise(height, width)
    decoded = decode_image(encode(Image.fromarray(pixels), fmt))
    assert decoded.mode == "RGB"
    assert (decoded.height, decoded.width) == (height, width)
    if fmt == "PNG":
        np.testing.assert_array_equal(np.asarray(decoded), pixels)


# ---------------------------------------------------------------- alpha is composited, never dropped


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgba_transparent_pixels_become_the_background(background, fmt) -> None:
    rgb = noise(20, 30)  # garbage colour under the transparent area, as real files have
    alpha = np.full((20, 30), 255, np.uint8)
    alpha[:, :10] = 0
    alpha[:, 10] = 128
    kwargs = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    decoded = as_array(
        decode_image(encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), fmt, **kwargs), background)
    )
    np.testing.assert_array_equal(decoded[:, :10], np.broadcast_to(background, (20, 10, 3)))
    np.testing.assert_array_equal(decoded[:, 11:], rgb[:, 11:])
    blend = rgb[:, 10].astype(np.float64) * 128 / 255 + np.array(background) * 127 / 255
    assert np.abs(decoded[:, 10] - blend).max() <= 1.0


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_la_is_composited(background) -> None:
    gray = noise(12, 8, channels=1)
    alpha = np.where(np.arange(8) < 3, 0, 255).astype(np.uint8)[None].repeat(12, 0)
    decoded = as_array(decode_image(encode(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"), background))
    np.testing.assert_array_equal(decoded[:, :3], np.broadcast_to(background, (12, 3, 3)))
    np.testing.assert_array_equal(decoded[:, 3:], np.repeat(gray[:, 3:, None], 3, axis=2))


def palette_image(height: int = 10, width: int = 12) -> Image.Image:
    indices = (np.arange(height * width).reshape(height, width) % 3).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * (256 * 3 - 9))  # index 0 = garbage colour
    return image


PALETTE_RGB = np.array([[10, 20, 30], [200, 0, 0], [0, 0, 250]])


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_index(background, fmt) -> None:
    image = palette_image()
    decoded = as_array(decode_image(encode(image, fmt, transparency=0), background))
    indices = np.asarray(image)
    expected = np.where((indices == 0)[..., None], np.array(background), PALETTE_RGB[indices])
    np.testing.assert_array_equal(decoded, expected)


def test_palette_with_partial_alpha_and_without_transparency() -> None:
    image = palette_image()
    indices = np.asarray(image)
    # tRNS with one alpha per palette entry: 0 (transparent), 255 (opaque), 0 (transparent)
    decoded = as_array(decode_image(encode(image, "PNG", transparency=bytes([0, 255, 0])), (1, 2, 3)))
    expected = np.where(np.isin(indices, [0, 2])[..., None], np.array([1, 2, 3]), PALETTE_RGB[indices])
    np.testing.assert_array_equal(decoded, expected)
    opaque = as_array(decode_image(encode(image, "PNG")))
    np.testing.assert_array_equal(opaque, PALETTE_RGB[indices])


def test_rgb_with_colour_key_transparency() -> None:
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[:, 3:] = (9, 99, 199)
    decoded = as_array(decode_image(encode(Image.fromarray(rgb), "PNG", transparency=(0, 0, 0)), (255, 0, 255)))
    np.testing.assert_array_equal(decoded[:, :3], np.broadcast_to((255, 0, 255), (6, 3, 3)))
    np.testing.assert_array_equal(decoded[:, 3:], rgb[:, 3:])


# ---------------------------------------------------------------- gray, bilevel, CMYK, wide ranges


def test_grayscale_and_bilevel_become_gray_rgb() -> None:
    gray = noise(9, 17, channels=1)
    decoded = as_array(decode_image(encode(Image.fromarray(gray, "L"), "PNG")))
    np.testing.assert_array_equal(decoded, np.repeat(gray[..., None], 3, axis=2))
    bits = gray > 127
    decoded = as_array(decode_image(encode(Image.fromarray(bits), "PNG")))
    assert Image.open(io.BytesIO(encode(Image.fromarray(bits), "PNG"))).mode == "1"
    np.testing.assert_array_equal(decoded, np.repeat(np.where(bits, 255, 0)[..., None], 3, axis=2))


def test_cmyk_jpeg_gives_the_right_colours() -> None:
    # Pillow writes CMYK JPEGs the Adobe way (inverted, APP14 marker) and reads them back;
    # pure inks must land on their RGB complements.
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]
    expected = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0), (255, 255, 255)]
    image = Image.new("CMYK", (16 * len(inks), 16))
    for i, ink in enumerate(inks):
        image.paste(ink, (16 * i, 0, 16 * (i + 1), 16))
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = as_array(decode_image(data))
    for i, colour in enumerate(expected):
        assert np.abs(decoded[4:12, 16 * i + 4 : 16 * i + 12] - np.array(colour)).max() <= 6, (inks[i], colour)


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 257, 1000], [32767, 32768, 65278, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = as_array(decode_image(data))
    expected = np.rint(values / 257.0)
    np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))


def test_sixteen_bit_gray_with_transparent_value() -> None:
    values = np.array([[0, 1000, 65535], [1000, 500, 1000]], dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in values)
    data = png_bytes(3, 2, 16, 0, raw, extra=png_chunk(b"tRNS", struct.pack(">H", 1000)))
    decoded = as_array(decode_image(data, (7, 8, 9)))
    transparent = values == 1000
    np.testing.assert_array_equal(decoded[transparent], np.broadcast_to((7, 8, 9), (3, 3)))
    np.testing.assert_array_equal(decoded[~transparent][:, 0], np.rint(values[~transparent] / 257.0))


def test_sixteen_bit_rgb_png() -> None:
    pixel = struct.pack(">HHH", 65535, 32896, 0)  # 32896 = 128 * 257
    raw = b"".join(b"\x00" + pixel * 3 for _ in range(2))
    decoded = as_array(decode_image(png_bytes(3, 2, 16, 2, raw)))
    np.testing.assert_array_equal(decoded, np.broadcast_to((255, 128, 0), (2, 3, 3)))


def test_float_tiff_scaled_by_its_range() -> None:
    unit = np.array([[0.0, 0.5, 1.0], [0.25, np.nan, 1.0]], dtype=np.float32)
    data = encode(Image.fromarray(unit), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    decoded = as_array(decode_image(data))[..., 0]
    np.testing.assert_array_equal(decoded, [[0, 128, 255], [64, 0, 255]])
    wide = np.array([[-5.0, 2.5, 10.0]], dtype=np.float32)  # outside [0, 255]: min-max
    np.testing.assert_array_equal(as_array(decode_image(encode(Image.fromarray(wide), "TIFF")))[0, :, 0], [0, 128, 255])
    byte_range = np.array([[0.0, 17.0, 200.0]], dtype=np.float32)  # within [0, 255]: kept
    np.testing.assert_array_equal(
        as_array(decode_image(encode(Image.fromarray(byte_range), "TIFF")))[0, :, 0], [0, 17, 200]
    )


def test_int32_gray_treated_as_sixteen_bit() -> None:
    values = np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(as_array(decode_image(data))[0, :, 0], [0, 0, 1, 255, 255])


# ---------------------------------------------------------------- EXIF orientation


def oriented(fmt: str, orientation: int, width: int = 40, height: int = 20) -> bytes:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = (0, 0, 255)
    pixels[:10, :10] = (255, 0, 0)  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    return encode(Image.fromarray(pixels), fmt, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_sizes(orientation: int) -> None:
    decoded = decode_image(oriented("JPEG", orientation))
    swapped = orientation >= 5
    assert (decoded.height, decoded.width) == ((40, 20) if swapped else (20, 40))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_rotates_clockwise(fmt: str) -> None:
    # Orientation 6: stored 40 wide x 20 high, shown rotated 90 degrees clockwise, so the stored
    # top-left corner is shown at the top-right and the viewer's (h, w) is (40, 20).
    decoded = as_array(decode_image(oriented(fmt, 6)))
    assert decoded.shape == (40, 20, 3)
    tolerance = 24 if fmt == "JPEG" else 0
    assert np.abs(decoded[2:8, 12:18] - np.array([255, 0, 0])).max() <= tolerance
    assert np.abs(decoded[2:8, 2:8] - np.array([0, 0, 255])).max() <= tolerance
    assert np.abs(decoded[32:38, 12:18] - np.array([0, 0, 255])).max() <= tolerance


# ---------------------------------------------------------------- bad input: typed reasons only


def truncated(fmt: str) -> bytes:
    data = encode(Image.fromarray(noise(128, 128, seed=3)), fmt)
    return data[: len(data) // 2]


def corrupt_png_idat() -> bytes:
    data = bytearray(encode(Image.fromarray(noise(64, 64, seed=4)), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 200] = bytes(200)  # damaged compressed data (chunk CRC now wrong too)
    return bytes(data)


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG; huge dimensions stay small on disk (zeros compress well)."""
    row = bytes(1 + (width + 7) // 8)
    return png_bytes(width, height, 1, 0, row * height)


BAD_INPUTS = {
    "empty": (lambda: b"", "empty_file"),
    "random_bytes": (
        lambda: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "unknown_format",
    ),
    "text": (lambda: b"<html><body>404 Not Found</body></html>\n" * 20, "unknown_format"),
    "truncated_jpeg": (lambda: truncated("JPEG"), "truncated_image"),
    "truncated_png": (lambda: truncated("PNG"), "truncated_image"),
    "truncated_webp": (lambda: truncated("WEBP"), "truncated_image"),
    "corrupt_png": (corrupt_png_idat, "corrupt_image"),
    "bomb_header_only": (lambda: png_bytes(50_000, 50_000, 1, 0, b""), "too_many_pixels"),
    "bomb_real_bilevel": (lambda: bilevel_png(20_000, 10_000), "too_many_pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_bad_sample_with_reason(name: str) -> None:
    make, reason = BAD_INPUTS[name]
    data = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadSample) as info:
            decode_image(data)
    assert info.value.reason == reason, str(info.value)
    assert caught == []  # no PIL warning leaks out of decode_image


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # 10000 x 10000 = 1e8 pixels: above Pillow's warning threshold, below its hard error; our
    # limit rejects it from the header alone, so no 100 MB buffer is decoded.
    data = bilevel_png(10_000, 10_000)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadSample) as info:
            decode_image(data, max_pixels=50_000_000)
    assert time.perf_counter() - start < 0.5
    assert info.value.reason == "too_many_pixels" and "max_pixels=50000000" in info.value.detail
    assert caught == []
    with pytest.raises(BadSample, match="too_many_pixels"):
        decode_image(encode(Image.new("RGB", (101, 100)), "PNG"), max_pixels=100 * 100)
    assert decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=100 * 100).size == (100, 100)


def test_mutated_files_only_ever_raise_bad_sample() -> None:
    rng = np.random.default_rng(5)
    image = Image.fromarray(noise(24, 24, seed=6))
    for fmt in ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"]:
        original = encode(image, fmt)
        for trial in range(40):
            data = bytearray(original)
            if trial % 2:
                data = data[: int(rng.integers(1, len(data)))]
            else:
                for _ in range(int(rng.integers(1, 8))):
                    data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            try:
                decoded = decode_image(bytes(data))
            except BadSample as error:
                assert error.reason in BAD_SAMPLE_REASONS
            else:
                assert decoded.mode == "RGB" and decoded.size == image.size


def test_bad_sample_round_trips_through_pickle_and_rejects_unknown_reasons() -> None:
    error = pickle.loads(pickle.dumps(BadSample("truncated_image", "cut at 100 bytes")))
    assert (error.reason, error.detail, str(error)) == (
        "truncated_image",
        "cut at 100 bytes",
        "truncated_image: cut at 100 bytes",
    )
    with pytest.raises(ValueError, match="unknown bad-sample reason"):
        BadSample("oops", "")
    with pytest.raises(ValueError, match="background"):
        decode_image(encode(Image.new("RGB", (2, 2)), "PNG"), background=(0, 0, 300))


# ---------------------------------------------------------------- counting bad samples


def test_bad_sample_counter_counts_merges_and_checks() -> None:
    first = BadSampleCounter()
    first.add("corrupt_image")
    first.add(BadSample("truncated_image", "x"), 2)
    second = pickle.loads(pickle.dumps(BadSampleCounter({"corrupt_image": 3, "empty_file": 1})))
    merged = first.merge(second)
    assert merged is first
    assert merged.as_dict() == {"corrupt_image": 4, "empty_file": 1, "truncated_image": 2}
    assert merged.total == 7 and merged["too_many_pixels"] == 0 and "too_many_pixels" not in merged
    assert dict(merged) == merged.as_dict() and len(merged) == 3
    merged.check(max_bad_fraction=0.07, seen=100)  # 7% allowed
    with pytest.raises(RuntimeError) as info:
        merged.check(max_bad_fraction=0.05, seen=100, config_key="data.max_bad_fraction")
    message = str(info.value)
    for part in ("7 of 100", "corrupt_image=4", "empty_file=1", "truncated_image=2", "data.max_bad_fraction=0.05"):
        assert part in message
    BadSampleCounter().check(0.0, seen=0)
    with pytest.raises(ValueError):
        merged.add("not_a_reason")
    with pytest.raises(ValueError):
        merged.check(1.5, seen=100)
    with pytest.raises(ValueError):
        merged.check(0.5, seen=3)


# ---------------------------------------------------------------- a real img2dataset shard


def test_real_cc12m_shard_decodes_at_the_recorded_size() -> None:
    if not CC12M_SHARD.exists():
        pytest.skip(f"{CC12M_SHARD} not present: real-shard check skipped")
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(CC12M_SHARD) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.rpartition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    images = [(key, parts) for key, parts in sorted(members.items()) if "jpg" in parts]
    assert len(images) == 32
    for key, parts in images:
        meta = json.loads(parts["json"])
        decoded = decode_image(parts["jpg"])
        # img2dataset stored a downscaled copy: the decoded image has the json's height/width;
        # original_height/original_width are the size before that resize, same aspect ratio.
        assert (decoded.height, decoded.width) == (meta["height"], meta["width"]), key
        ratio_stored = decoded.height / decoded.width
        ratio_original = meta["original_height"] / meta["original_width"]
        assert abs(np.log(ratio_stored / ratio_original)) < 2.0 / min(decoded.size), key

"""Decode image bytes from a shard into an 8-bit RGB PIL image, or fail with a typed reason.

Real web data holds empty files, HTML error pages, truncated downloads, decompression bombs,
transparent palettes, CMYK, 16-bit and float images, and photos whose pixels are stored sideways
with an EXIF orientation tag. `decode_image` turns each of these into either a viewer-correct RGB
image or a `BadSample` whose `reason` is one short word from `BAD_SAMPLE_REASONS`, so the loader
can skip the sample and count it (`BadSampleCounter`) instead of crashing or training on garbage.

Size convention: the returned image is EXIF-transposed, so its (h, w) is the image as a viewer
sees it; that is what SDXL's `original_size_as_tuple` records. `decode_image_oriented` also says
whether orientation 5-8 turned the image by 90 degrees, so a size recorded for the stored
(pre-EXIF) pixels, as img2dataset's json records it, can be turned upright too (samples.py).

Conversion rules (the why of each is in `_to_rgb`):
- alpha (RGBA, LA, PA, premultiplied RGBa/La, palette or RGB/L with a `transparency` key) is
  composited onto `background`, so fully transparent pixels become exactly the background;
- 1, L, RGBX, YCbCr, LAB, HSV: PIL's own conversion;
- CMYK: PIL's conversion; Pillow's JPEG reader already undoes the inverted CMYK that Adobe writes
  (APP14 marker), ICC profiles are not applied (no colour management);
- I;16 / I;16B / I;16L / I;16N: 0..65535 scaled to 0..255 (round(v / 257));
  I (32-bit, which Pillow historically used for 16-bit PNGs): clipped to 0..65535, then as I;16;
  F: values in [0, 1] are scaled by 255, values in [0, 255] kept, any other range min-max
  normalised; NaN/inf become 0. 16-bit-per-channel RGB(A) PNGs are reduced to 8 bits by Pillow.
Multi-frame files (GIF, animated WebP) give their first frame.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BAD_SAMPLE_REASONS: tuple[str, ...] = (
    "empty_file",  # zero bytes
    "unknown_format",  # not an image format Pillow knows (text, HTML, random bytes)
    "corrupt_image",  # a known format whose data fails to decode
    "truncated_image",  # the file ends before the image data does
    "too_many_pixels",  # header claims more pixels than max_pixels (decompression bomb)
    "unsupported_mode",  # a pixel mode with no sensible RGB conversion
    "corrupt_exif",  # pixels decoded but the EXIF orientation could not be applied
)

_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # transpose, rotate 270, transverse, rotate 90: height and width swap
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of BAD_SAMPLE_REASONS, `detail` is free text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in BAD_SAMPLE_REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; use one of {BAD_SAMPLE_REASONS}")
        super().__init__(reason, detail)  # args round-trip through pickle (DataLoader workers)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def decode_image(
    data: bytes,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = 178_956_970,
) -> Image.Image:
    """Decode `data` to an RGB image (EXIF orientation applied), or raise BadSample.

    The pixel count is read from the header (Image.open is lazy) and checked against
    `max_pixels` before any pixel is decoded. Pillow's own bomb check inside Image.open still
    applies (no global state is changed here), so `max_pixels` above 2 * PIL.Image.MAX_IMAGE_PIXELS
    (178,956,970 by default) cannot admit more. Only BadSample leaves this function for bad data.
    """
    return decode_image_oriented(data, background, max_pixels)[0]


def decode_image_oriented(
    data: bytes,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = 178_956_970,
) -> tuple[Image.Image, bool]:
    """`decode_image`, plus whether EXIF orientation 5-8 swapped the stored height and width."""
    if len(background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in background):
        raise ValueError(f"background must be three ints in 0..255 (an RGB colour), got {background!r}")
    if not data:
        raise BadSample("empty_file", "0 bytes")
    with warnings.catch_warnings():
        # DecompressionBombWarning, corrupt-EXIF and palette-transparency warnings are all either
        # turned into BadSample below or harmless; none should reach the training log per sample.
        warnings.simplefilter("ignore")
        image = _open_checked(data, max_pixels)
        image, orientation = _apply_exif_orientation(image)
        try:
            return _to_rgb(image, background), orientation in _QUARTER_TURNS
        except BadSample:
            raise
        except Exception as error:
            raise BadSample("corrupt_image", f"{type(error).__name__}: {error}") from error


def _open_checked(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open lazily, check the header's pixel count, then decode the first frame fully."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadSample("too_many_pixels", str(error)) from error
    except UnidentifiedImageError as error:
        raise BadSample("unknown_format", f"not a recognised image ({len(data)} bytes)") from error
    except Exception as error:
        raise _classify(error, data) from error
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadSample("corrupt_image", f"header gives size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise BadSample("too_many_pixels", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    try:
        image.load()
    except Exception as error:
        raise _classify(error, data) from error
    return image


def _classify(error: BaseException, data: bytes) -> BadSample:
    """Map a decoder exception to truncated_image or corrupt_image by what Pillow says."""
    if isinstance(error, MemoryError):
        return BadSample("too_many_pixels", "out of memory while decoding")
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, EOFError) or "truncated" in str(error).lower() or _webp_is_short(data):
        return BadSample("truncated_image", message)
    return BadSample("corrupt_image", message)


def _webp_is_short(data: bytes) -> bool:
    """WebP states its length in the RIFF header; Pillow's error for a cut file does not say so."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return len(data) < int.from_bytes(data[4:8], "little") + 8


def _apply_exif_orientation(image: Image.Image) -> tuple[Image.Image, int]:
    """Rotate/mirror the pixels as EXIF orientation 2..8 says, so (h, w) is what a viewer sees.

    Returns the image and the orientation applied (1 when none was, e.g. unreadable EXIF).
    """
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:
        return image, 1
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image, 1
    try:
        return ImageOps.exif_transpose(image), orientation
    except Exception as error:
        raise BadSample("corrupt_exif", f"orientation {orientation}: {type(error).__name__}: {error}") from error


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha is composited, wide ranges are scaled, not clipped."""
    mode = image.mode
    if mode in _WIDE_GRAY_MODES:
        raw = np.asarray(image)
        rgb = _gray_to_rgb(_wide_gray_to_8bit(raw, mode))
        key = image.info.get("transparency")
        if isinstance(key, (int, float)):  # PNG tRNS on 16-bit gray: one raw value is transparent
            alpha = Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), mode="L")
            return _composite(rgb, alpha, background)
        return rgb
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # A bare convert("RGB") drops alpha and shows whatever colour sits under transparent
        # pixels (often black or garbage); compositing shows what a viewer would.
        if mode == "La":
            image = image.convert("LA")  # Pillow converts La only to LA
        rgba = image.convert("RGBA")
        return _composite(rgba.convert("RGB"), rgba.getchannel("A"), background)
    if mode == "RGB":
        return image
    if mode in _PIL_RGB_MODES:
        return image.convert("RGB")
    raise BadSample("unsupported_mode", f"no RGB conversion for PIL mode {mode!r}")


def _wide_gray_to_8bit(raw: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit int and float gray -> 0..255 by the mode's range, rounding to nearest."""
    if mode == "F":
        return _float_to_8bit(raw.astype(np.float64))
    values = np.clip(raw.astype(np.int64), 0, 65535)  # I: Pillow's old container for 16-bit PNGs
    return (values * 255 + 32767) // 65535  # == round(v / 257)


def _composite(rgb: Image.Image, alpha: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-blend onto a solid background: alpha 0 gives exactly the background colour."""
    out = Image.new("RGB", rgb.size, tuple(int(c) for c in background))
    out.paste(rgb, mask=alpha)
    return out


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    """Float gray -> 0..255: [0,1] data is scaled by 255, [0,255] kept, anything else min-max."""
    values = np.where(np.isfinite(values), values, 0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255)


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")


class BadSampleCounter(Mapping[str, int]):
    """Counts bad samples by reason; picklable, so workers can send theirs to be merged.

    Subclasses that know more reasons (the loader's, the latent reader's) only widen `reasons`.
    """

    reasons: tuple[str, ...] = BAD_SAMPLE_REASONS

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self._counts: dict[str, int] = {}
        for reason, count in (counts or {}).items():
            self.add(reason, count)

    def add(self, reason: str | BadSample, count: int = 1) -> None:
        """Count one (or `count`) bad samples; accepts the BadSample itself or its reason."""
        if isinstance(reason, BadSample):
            reason = reason.reason
        if reason not in self.reasons:
            raise ValueError(f"unknown bad-sample reason {reason!r}; use one of {self.reasons}")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count:
            self._counts[reason] = self._counts.get(reason, 0) + count

    def merge(self, other: Mapping[str, int]) -> BadSampleCounter:
        """Add another counter's (or dict's) counts into this one; returns self."""
        for reason, count in other.items():
            self.add(reason, count)
        return self

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Counts by reason, sorted by reason, for logging."""
        return dict(sorted(self._counts.items()))

    def check(self, max_bad_fraction: float, seen: int, config_key: str = "data.max_bad_fraction") -> None:
        """Raise RuntimeError when more than `max_bad_fraction` of the `seen` samples were bad.

        `seen` counts every sample read, good or bad.
        """
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"{config_key} must lie in [0, 1], got {max_bad_fraction}")
        if seen < self.total:
            raise ValueError(f"seen={seen} is smaller than the {self.total} bad samples counted")
        if seen == 0 or self.total / seen <= max_bad_fraction:
            return
        counts = ", ".join(f"{reason}={count}" for reason, count in self.as_dict().items())
        raise RuntimeError(
            f"{self.total} of {seen} samples ({self.total / seen:.1%}) could not be used ({counts}), "
            f"more than {config_key}={max_bad_fraction}. Check or rebuild the shards, "
            f"or raise {config_key} to accept this many bad samples."
        )

    def __getitem__(self, reason: str) -> int:
        return self._counts.get(reason, 0)  # a reason never seen counts 0

    def __contains__(self, reason: object) -> bool:
        return reason in self._counts

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"BadSampleCounter({self.as_dict()})"

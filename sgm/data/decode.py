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

Draft decoding (`decode_image_draft`): a JPEG at least twice the size its caller will resize it to
is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's draft mode), the largest reduction
whose output still covers that size; ~3x less CPU for a photo going to 256 px. Other formats
decode fully: PNG has no reduced decode, and Pillow's WebP decoder exposes none.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

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
    decoded = decode_image_draft(data, None, background, max_pixels)
    return decoded.image, decoded.quarter_turned


class Decoded(NamedTuple):
    """A decoded image, maybe reduced by draft decoding, and the size it has at full scale."""

    image: Image.Image  # RGB, upright; (full_size / draft_scale) rounded up when drafted
    quarter_turned: bool  # EXIF orientation 5-8 swapped the stored height and width
    full_size: tuple[int, int]  # (h, w) upright, as a full decode gives it
    draft_scale: int  # 1, 2, 4 or 8: pixel (i, j) covers full pixels [i*s, (i+1)*s) x [j*s, (j+1)*s)


NeededSize = Callable[[int, int], "tuple[int, int] | None"]


def decode_image_draft(
    data: bytes,
    needed_size: NeededSize | None,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = 178_956_970,
) -> Decoded:
    """`decode_image_oriented`, decoding a JPEG at reduced scale when that still covers the need.

    `needed_size(h, w)` gets the upright full size from the header and returns the upright (h, w)
    the caller will resize to (None: decode fully). A JPEG is drafted at the largest scale 1/2, 1/4,
    1/8 whose output, ceil(size / scale) pixels in stored orientation, is at least the need on both
    axes (so the source is at least about twice the need); otherwise, and for other formats, the
    full decode runs. The output spans size / scale of its pixels, so the resize after it
    stretches by less than one pixel at most (1365 px at 1/4: 341.25 -> 342).
    """
    if len(background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in background):
        raise ValueError(f"background must be three ints in 0..255 (an RGB colour), got {background!r}")
    if not data:
        raise BadSample("empty_file", "0 bytes")
    with warnings.catch_warnings():
        # DecompressionBombWarning, corrupt-EXIF and palette-transparency warnings are all either
        # turned into BadSample below or harmless; none should reach the training log per sample.
        warnings.simplefilter("ignore")
        image, (stored_w, stored_h), draft_scale = _open_checked(data, max_pixels, needed_size)
        image, orientation = _apply_exif_orientation(image)
        quarter_turned = orientation in _QUARTER_TURNS
        full_size = (stored_w, stored_h) if quarter_turned else (stored_h, stored_w)
        try:
            return Decoded(_to_rgb(image, background), quarter_turned, full_size, draft_scale)
        except BadSample:
            raise
        except Exception as error:
            raise BadSample("corrupt_image", f"{type(error).__name__}: {error}") from error


def _open_checked(
    data: bytes, max_pixels: int | None, needed_size: NeededSize | None
) -> tuple[Image.Image, tuple[int, int], int]:
    """Open lazily, check the header's pixel count, then decode the first frame (maybe drafted).

    Returns the image, its stored (w, h) at full scale, and the draft scale (1: full decode)."""
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
    draft_scale = _draft(image, needed_size) if needed_size is not None and image.format == "JPEG" else 1
    try:
        image.load()
    except Exception as error:
        raise _classify(error, data) from error
    return image, (width, height), draft_scale


def _draft(image: Image.Image, needed_size: NeededSize) -> int:
    """Put a JPEG in draft mode when the need allows a 1/2..1/8 scale; returns the scale (1: none)."""
    width, height = image.size
    # The same EXIF read as _apply_exif_orientation's, so the turn predicted here is the one applied.
    quarter_turned = _orientation(image) in _QUARTER_TURNS
    need = needed_size(*((width, height) if quarter_turned else (height, width)))
    if need is None:
        return 1
    need_w, need_h = (need[0], need[1]) if quarter_turned else (need[1], need[0])  # stored orientation
    # The largest scale whose output (ceil(size / scale) pixels) still has the need's pixel count.
    # PIL's own choice, floor(size / need), misses e.g. 1/4 for 1365 px -> 342 (ceil(1365/4) = 342).
    scale = next((s for s in (8, 4, 2) if -(-width // s) >= need_w and -(-height // s) >= need_h), 1)
    if scale == 1:
        return 1
    try:  # asking for (size // scale) makes PIL pick exactly `scale`
        drafted = image.draft(image.mode, (width // scale, height // scale))
    except Exception:
        return 1  # an odd JPEG: decode it fully, the ordinary checks classify any fault
    if drafted is None:
        return 1
    return round(width / drafted[1][2])  # draft's box is (0, 0, width / scale, height / scale)


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(_EXIF_ORIENTATION)
    except Exception:
        return None


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
    orientation = _orientation(image)
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

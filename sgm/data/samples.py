"""What a sample is: the strategy a SlotStream uses per raw sample, and the image strategy.

A SlotStream (stream.py) reads, shuffles, buckets, batches and snapshots; it does not know what
a sample holds. A `SampleProcessor` does:
- `process(raw, position, rng) -> (bucket_key, sample)` turns one raw webdataset sample
  ({"__key__", ext: bytes, ...}) into a bucket key (an int or a tuple of ints, so snapshots stay
  JSON) and any object, or raises `Skip(reason)`. It must be deterministic given raw, position
  and rng (rng is seeded by the sample's position; None when `needs_rng` is False): a resume
  re-processes buffered samples and must get the same result.
- `collate(samples)` makes one batch of samples that share a bucket key.
- `fingerprint()` lists its settings; a resume with other settings is refused.
ImageProcessor (here) decodes, buckets by aspect ratio, resizes, crops and records SDXL's
micro-conditioning; LatentProcessor (latent_loader.py) reads cached latents.

`aesthetic_score` (the refiner's conditioning) is read from the sample json as LAION writes it
(`aesthetic_score`, `AESTHETIC_SCORE` or `aesthetic`); a sample without a finite number there
gets `default_aesthetic_score`. With no default, a batch carries `aesthetic_score` only when
every sample in it has one (base-model data needs none); a refiner run should set a default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sgm.data.buckets import assign_bucket, no_upscale_bucket, no_upscale_grid
from sgm.data.crop import CROP_MODES, CroppedSample, covering_size, resize_and_crop
from sgm.data.decode import BadSample, decode_image_draft
from sgm.data.shard_list import LOADER_BAD_REASONS, LoaderBadCounter

Position = tuple[int, int, int]  # (epoch, shard index in the shard list, sample offset in the shard)
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
BUCKET_BY = ("decoded", "original")
AESTHETIC_KEYS: tuple[str, ...] = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic")
LATENT_BAD_REASONS: tuple[str, ...] = (
    "missing_latent",  # no <key>.latent.npy member
    "bad_latent",  # latent.npy unreadable or not [C, h, w]
    "bad_conditioning",  # the cached json lacks a valid size, crop or caption
    "missing_text_embeddings",  # text embeddings asked for but not cached for this sample
    "bad_text_embeddings",  # text.safetensors unreadable
)
STREAM_BAD_REASONS: tuple[str, ...] = LOADER_BAD_REASONS + LATENT_BAD_REASONS


class StreamBadCounter(LoaderBadCounter):
    """LoaderBadCounter that also accepts the cached-latent reasons (STREAM_BAD_REASONS)."""

    reasons = STREAM_BAD_REASONS


class Skip(Exception):
    """Raised by a processor for a sample to skip; `reason` is one of STREAM_BAD_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SampleProcessor(Protocol):
    """One raw sample -> (bucket key, sample); a list of same-key samples -> a batch."""

    needs_rng: bool

    def process(
        self, raw: dict[str, Any], position: Position, rng: np.random.Generator | None
    ) -> tuple[Hashable, Any]: ...

    def collate(self, samples: Sequence[Any]) -> dict[str, Any]: ...

    def fingerprint(self) -> dict[str, Any]: ...


# -- json helpers, shared by the image and latent paths --------------------------------------------
def read_json(data: bytes | None, reason: str = "bad_json") -> dict[str, Any] | None:
    """The sample json as a dict (None when absent); unparsable or not an object -> Skip(reason)."""
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise Skip(reason) from None
    if not isinstance(meta, dict):
        raise Skip(reason)
    return meta


def positive_int(value: Any) -> int | None:
    """A positive whole number (1024 or 1024.0), else None; json may hold NaN, inf, strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value == int(value) and value > 0 else None


def json_original_size(meta: dict[str, Any] | None, quarter_turned: bool = False) -> tuple[int, int] | None:
    """(original_height, original_width) from img2dataset's json, upright; None when not given.

    The json's size describes the STORED pixels, before EXIF orientation (img2dataset measures
    with OpenCV's IMREAD_UNCHANGED, which ignores EXIF; our shard tool records the same). When
    decoding turned the image by 90 degrees (EXIF orientation 5-8, `quarter_turned`), the size is
    swapped so it is the upright (h, w) a viewer sees, like the decoded image. Re-encoded
    img2dataset images carry no EXIF, so their stored size already is upright and is kept.
    """
    if meta is None:
        return None
    height, width = meta.get("original_height"), meta.get("original_width")
    if height is None or width is None:
        return None
    size = (positive_int(height), positive_int(width))
    if None in size:
        raise Skip("bad_json")
    return size[::-1] if quarter_turned else size  # type: ignore[return-value]


def aesthetic_score(meta: dict[str, Any] | None, default: float | None) -> float | None:
    """The first finite number under AESTHETIC_KEYS, else `default` (null/NaN/text count as missing)."""
    for key in AESTHETIC_KEYS if meta else ():
        value = meta.get(key)  # type: ignore[union-attr]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return default


def collate_aesthetic(batch: dict[str, Any], scores: Sequence[float | None]) -> None:
    """Add float32 [B] `aesthetic_score` when every sample has one (see the module docstring)."""
    if scores and all(score is not None for score in scores):
        batch["aesthetic_score"] = torch.tensor(scores, dtype=torch.float32)


# -- images ----------------------------------------------------------------------------------------
@dataclass
class ImageSample:
    key: str
    caption: str
    crop: CroppedSample
    aesthetic_score: float | None


@dataclass(frozen=True)
class ImageProcessor:
    """Decode, bucket by aspect ratio, resize to cover, crop (maybe flip), record micro-conditioning.

    Image from the first of jpg/jpeg/png/webp, caption from txt, original size from the json's
    (original_height, original_width) when present (img2dataset stores resized copies), turned
    upright when EXIF orientation 5-8 rotated the pixels (`json_original_size`), else the decoded
    size. The image is decoded before the json's size is read, so an unusable image is counted by
    its own reason (e.g. `empty_file`) even when its json is bad too. The bucket is chosen by the DECODED aspect ratio (`bucket_by`), since that is the
    image that gets cropped; the optional `min_size` filter tests the recorded original size.
    `draft_decode` (with bucket_by="decoded") decodes a JPEG at least twice its cover-resize size at
    1/2..1/8 scale (decode.py); the recorded sizes and crop are exactly the full decode's.

    `bucket_no_upscale`: an image whose decoded pixels do not cover its bucket is not upscaled
    to it; it goes to a smaller bucket of (about) the same aspect ratio that it does cover, each
    side rounded down to the table's grid (buckets.no_upscale_bucket / no_upscale_grid: 64 px
    for the SDXL tables from 512 up, never a side below 256 px or the table's smallest side).
    The bucket key is then the bucket's (h, w) itself, for every sample, so a batch still holds
    one size; `target_size_as_tuple` is that bucket, `original_size_as_tuple` and the crop are
    recorded as always. Off (the default), keys are table indices and nothing changes; on, every
    setting is part of `fingerprint()` (so states saved without it still resume when it is off).
    Used through StreamConfig(buckets=(), processor=ImageProcessor(..., bucket_no_upscale=True)).
    """

    buckets: tuple[tuple[int, int], ...]
    crop: str = "random"
    flip_probability: float = 0.0
    bucket_by: str = "decoded"
    min_size: int | None = None
    max_pixels: int | None = 178_956_970
    default_aesthetic_score: float | None = None
    draft_decode: bool = True
    needs_rng: bool = True
    bucket_no_upscale: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.buckets or any(len(b) != 2 or min(b) <= 0 for b in self.buckets):
            problems.append(f"buckets must be positive (h, w) pairs, got {self.buckets!r}")
        if not 0.0 <= self.flip_probability <= 1.0:
            problems.append(f"flip_probability must lie in [0, 1], got {self.flip_probability}")
        if self.crop not in CROP_MODES:
            problems.append(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.bucket_by not in BUCKET_BY:
            problems.append(f"bucket_by must be one of {BUCKET_BY}, got {self.bucket_by!r}")
        if self.min_size is not None and self.min_size < 1:
            problems.append(f"min_size must be None (off) or >= 1, got {self.min_size}")
        if self.default_aesthetic_score is not None and not math.isfinite(self.default_aesthetic_score):
            problems.append(f"default_aesthetic_score must be None or finite, got {self.default_aesthetic_score}")
        if problems:
            raise ValueError("invalid data stream config: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Any) -> ImageProcessor:
        """The processor a StreamConfig's image fields describe."""
        return cls(
            buckets=config.buckets,
            crop=config.crop,
            flip_probability=config.flip_probability,
            bucket_by=config.bucket_by,
            min_size=config.min_size,
            max_pixels=config.max_pixels,
            default_aesthetic_score=config.default_aesthetic_score,
            draft_decode=config.draft_decode,
        )

    def fingerprint(self) -> dict[str, Any]:
        if not self.bucket_no_upscale:
            return {"kind": "image"}  # its settings are StreamConfig fields, fingerprinted there
        # used as StreamConfig.processor: its settings are fingerprinted here (draft_decode left out, as there)
        return {
            "kind": "image",
            "buckets": [list(b) for b in self.buckets],
            "crop": self.crop,
            "flip_probability": self.flip_probability,
            "bucket_by": self.bucket_by,
            "min_size": self.min_size,
            "max_pixels": self.max_pixels,
            "default_aesthetic_score": self.default_aesthetic_score,
            "bucket_no_upscale": True,
        }

    def process(
        self, raw: dict[str, Any], position: Position, rng: np.random.Generator | None
    ) -> tuple[Hashable, ImageSample]:
        """Decode, pick the bucket, resize and crop one raw sample; raises Skip(reason)."""
        if "__duplicate__" in raw:
            raise Skip("duplicate_member")
        image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_key is None:
            raise Skip("missing_image")
        if "txt" not in raw:
            raise Skip("missing_caption")
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Skip("bad_caption") from None
        try:
            drafting = self.draft_decode and self.bucket_by == "decoded"
            image, quarter_turned, decoded, draft_scale = decode_image_draft(
                raw[image_key], self._needed_size if drafting else None, max_pixels=self.max_pixels
            )
        except BadSample as bad:
            raise Skip(bad.reason) from None
        meta = read_json(raw.get("json"))
        original = json_original_size(meta, quarter_turned) or decoded
        if self.min_size is not None and min(original) < self.min_size:
            raise Skip("too_small")
        bucket, bucket_hw = self._bucket(decoded, original)
        crop = resize_and_crop(
            image,
            bucket_hw,
            crop=self.crop,
            flip_probability=self.flip_probability,
            rng=rng,
            original_size_as_tuple=original,
            full_size=decoded,
            draft_scale=draft_scale,
        )
        score = aesthetic_score(meta, self.default_aesthetic_score)
        return bucket, ImageSample(raw["__key__"], caption, crop, score)

    def _bucket(self, decoded: tuple[int, int], original: tuple[int, int]) -> tuple[Hashable, tuple[int, int]]:
        """(bucket key, bucket (h, w)) for an image of `decoded` upright pixels (see the class docstring)."""
        index = assign_bucket(*(decoded if self.bucket_by == "decoded" else original), self.buckets)
        if not self.bucket_no_upscale:
            return index, self.buckets[index]
        smaller = no_upscale_bucket(*decoded, self.buckets[index], *no_upscale_grid(self.buckets))
        return smaller, smaller

    def _needed_size(self, height: int, width: int) -> tuple[int, int]:
        """The upright (h, w) an image of full upright size (h, w) is resized to (draft decoding)."""
        return covering_size(height, width, *self._bucket((height, width), (height, width))[1])

    def collate(self, samples: Sequence[ImageSample]) -> dict[str, Any]:
        def sizes(name: str) -> torch.Tensor:
            return torch.tensor([getattr(s.crop, name) for s in samples], dtype=torch.long)

        batch = {
            "jpg": torch.stack([s.crop.pixels for s in samples]),
            "txt": [s.caption for s in samples],
            "original_size_as_tuple": sizes("original_size_as_tuple"),
            "crop_coords_top_left": sizes("crop_coords_top_left"),
            "target_size_as_tuple": sizes("target_size_as_tuple"),
            "__key__": [s.key for s in samples],
        }
        collate_aesthetic(batch, [s.aesthetic_score for s in samples])
        return batch

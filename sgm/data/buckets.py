"""Aspect-ratio buckets: the SDXL paper's 40 (h, w) sizes, scaled tables, nearest-ratio assignment.

Multi-aspect training groups images by the bucket whose aspect ratio is nearest, so each batch
shares one (h, w) and little of any image is cropped away. Nearness is measured in log space
(|log(h/w) - log(bh/bw)|), where a 2:1 and a 1:2 image are equally far from square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

# fmt: off
# SDXL paper, appendix I, as (height, width), ordered by ascending h/w (see SDXL_SPEC.md section 8).
SDXL_BUCKETS_1024: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
# fmt: on

Bucket = tuple[int, int]


def default_multiple(base_resolution: int) -> int:
    """Side granularity: 64 from 512 up (as in the paper's table), 32 below, where 64 would
    leave too few distinct ratios; 32 pixels is still 4 latent cells at the VAE's factor 8."""
    return 64 if base_resolution >= 512 else 32


def bucket_table(base_resolution: int, multiple: int | None = None) -> list[Bucket]:
    """The paper's 40 buckets scaled to `base_resolution`, each side rounded to `multiple`.

    Each side is scaled by base/1024 and rounded half-up to a multiple of `multiple` (at least
    one multiple). Buckets whose rounded ratio h/w repeats an earlier one are dropped, since
    assignment could never choose them; the result is sorted by ascending h/w. At 1024 with
    multiple 64 this is exactly SDXL_BUCKETS_1024. `multiple` defaults to default_multiple(base).
    """
    if multiple is None:
        multiple = default_multiple(base_resolution)
    if base_resolution <= 0 or multiple <= 0:
        raise ValueError(f"base_resolution and multiple must be positive, got {base_resolution}, {multiple}")

    def scale(side: int) -> int:
        exact = Fraction(side * base_resolution, 1024)
        return max(multiple, math.floor(exact / multiple + Fraction(1, 2)) * multiple)

    table: list[Bucket] = []
    ratios: set[Fraction] = set()
    for height, width in SDXL_BUCKETS_1024:
        bucket = (scale(height), scale(width))
        ratio = Fraction(*bucket)
        if ratio not in ratios:
            ratios.add(ratio)
            table.append(bucket)
    return sorted(table, key=lambda hw: Fraction(*hw))


def square_table(size: int) -> list[Bucket]:
    """The one-bucket table of the fixed-size stages (256^2, 512^2)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return [(size, size)]


def aspect_error(height: int, width: int, bucket: Bucket) -> float:
    """|log(h/w) - log(bucket_h/bucket_w)|: how far the image's shape is from the bucket's."""
    _check_size(height, width)
    return abs(math.log(height * bucket[1] / (width * bucket[0])))


def assign_bucket(height: int, width: int, table: Sequence[Bucket]) -> int:
    """Index of the bucket with the nearest aspect ratio in log space.

    Compared exactly in integers, so the choice never depends on float rounding; an exact tie
    goes to the lower index (the wider bucket in a table sorted by h/w).
    """
    _check_size(height, width)
    if not table:
        raise ValueError("bucket table is empty")
    best, best_big, best_small = -1, 0, 1
    for index, (bucket_h, bucket_w) in enumerate(table):
        # exp(|log q|) = big/small with q = (h * bw) / (w * bh); smaller is nearer.
        a, b = height * bucket_w, width * bucket_h
        big, small = max(a, b), min(a, b)
        if best < 0 or big * best_small < best_big * small:
            best, best_big, best_small = index, big, small
    return best


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got (h, w) = ({height}, {width})")


# -- no upscaling (bucket_no_upscale) --------------------------------------------------------------
NO_UPSCALE_MIN_SIDE = 256  # like kohya's min_bucket_reso: no bucket side below this (or the table's smallest side)
NO_UPSCALE_MAX_MULTIPLE = 64


def no_upscale_grid(table: Sequence[Bucket]) -> tuple[int, int]:
    """(multiple, min_side) of the smaller buckets `no_upscale_bucket` makes for `table`.

    multiple: the table's own side granularity (gcd of its sides), at most 64: 64 for the SDXL
    tables from 512 up, 32 below, 64 for a square 256 or 512 stage. min_side: NO_UPSCALE_MIN_SIDE,
    or the table's smallest side when that is smaller (a 128 px table: 64), rounded down to the
    multiple and at least one multiple."""
    if not table:
        raise ValueError("bucket table is empty")
    multiple = min(NO_UPSCALE_MAX_MULTIPLE, math.gcd(*(side for bucket in table for side in bucket)))
    smallest = min(min(bucket) for bucket in table)
    min_side = max(multiple, min(NO_UPSCALE_MIN_SIDE, smallest) // multiple * multiple)
    return multiple, min_side


def no_upscale_bucket(height: int, width: int, bucket: Bucket, multiple: int, min_side: int) -> Bucket:
    """The bucket an image of (height, width) pixels is trained at without being upscaled.

    `bucket` is the table's bucket for the image's aspect ratio. When the image covers it (both
    sides at least the bucket's), it is kept. Otherwise the bucket is scaled by
    s = min(height / bh, width / bw), the largest scale at which the image still covers it, and
    each side is rounded to the nearest multiple of `multiple` but never past the image's side
    rounded down to that multiple: the result lies inside the image (which is only downscaled, or
    kept, to cover it) and keeps the bucket's aspect ratio up to that rounding. A bucket whose
    shorter side would fall below `min_side` becomes the smallest bucket of that aspect (shorter
    side min_side, the other rounded to the nearest multiple): an image smaller than that is
    still upscaled to it, as kohya's bucket_no_upscale does at min_bucket_reso. Exact integer
    arithmetic, so the choice never depends on float rounding.
    """
    _check_size(height, width)
    bucket_h, bucket_w = bucket
    if height >= bucket_h and width >= bucket_w:
        return bucket_h, bucket_w
    scale = min(Fraction(height, bucket_h), Fraction(width, bucket_w))
    limits = (height // multiple * multiple, width // multiple * multiple)
    shorter = min(bucket_h, bucket_w)
    if shorter * scale < min_side:  # below the smallest bucket of this aspect: no image limit
        scale, limits = Fraction(min_side, shorter), (bucket_h, bucket_w)

    def side(length: int, limit: int) -> int:
        nearest = math.floor(length * scale / multiple + Fraction(1, 2)) * multiple
        return max(multiple, min(nearest, limit, length))

    return side(bucket_h, limits[0]), side(bucket_w, limits[1])

"""Bucket tables (the paper's 40 and their scaled versions) and nearest-aspect assignment."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from sgm.data.buckets import (
    SDXL_BUCKETS_1024,
    aspect_error,
    assign_bucket,
    bucket_table,
    default_multiple,
    square_table,
)

SPEC = Path("/work/shared/SDXL_SPEC.md")


def log_ratio(bucket: tuple[int, int]) -> float:
    return math.log(bucket[0] / bucket[1])


def test_paper_buckets_match_the_spec_in_order() -> None:
    if SPEC.exists():
        section = SPEC.read_text().split("## 8.")[1].split("##")[0]
        listed = [(int(h), int(w)) for h, w in re.findall(r"(\d+)x(\d+)", section.split("\n", 1)[1])]
        assert list(SDXL_BUCKETS_1024) == listed
    assert len(SDXL_BUCKETS_1024) == 40 and len(set(SDXL_BUCKETS_1024)) == 40
    ratios = [h / w for h, w in SDXL_BUCKETS_1024]
    assert ratios == sorted(ratios) and ratios[0] == 0.25 and ratios[-1] == 4.0
    assert SDXL_BUCKETS_1024[20] == (1024, 1024)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in SDXL_BUCKETS_1024)
    assert all(0.9 * 1024**2 <= h * w <= 1024**2 for h, w in SDXL_BUCKETS_1024)


def test_table_at_1024_is_the_paper_table() -> None:
    assert bucket_table(1024) == list(SDXL_BUCKETS_1024)
    assert bucket_table(1024, multiple=64) == list(SDXL_BUCKETS_1024)


@pytest.mark.parametrize("base, multiple", [(512, 64), (256, 32), (768, 64), (2048, 64), (512, 32)])
def test_scaled_tables(base: int, multiple: int) -> None:
    table = bucket_table(base, multiple)
    ratios = [h / w for h, w in table]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)  # sorted, no dead buckets
    assert all(h % multiple == 0 and w % multiple == 0 for h, w in table)
    assert (base, base) in table and ratios[0] == 0.25 and ratios[-1] == 4.0
    assert all(0.75 * base**2 <= h * w <= 1.25 * base**2 for h, w in table)
    # each bucket is a paper bucket scaled by base/1024 with sides rounded to the nearest multiple
    for h, w in table:
        assert any(
            abs(h - ph * base / 1024) <= multiple / 2 and abs(w - pw * base / 1024) <= multiple / 2
            for ph, pw in SDXL_BUCKETS_1024
        ), (h, w)
    assert len(table) <= len(SDXL_BUCKETS_1024)


def test_scaled_table_examples_and_default_multiple() -> None:
    assert default_multiple(1024) == 64 and default_multiple(512) == 64 and default_multiple(256) == 32
    table_512 = bucket_table(512)
    assert table_512[:3] == [(256, 1024), (256, 960), (320, 896)]  # 256x992 rounds to 256x1024: dropped
    assert len(table_512) == 23
    table_256 = bucket_table(256)
    assert table_256[0] == (128, 512) and table_256[-1] == (512, 128) and len(table_256) == 23
    assert bucket_table(512, multiple=32) == [(h // 2, w // 2) for h, w in SDXL_BUCKETS_1024]
    assert square_table(256) == [(256, 256)] and square_table(512) == [(512, 512)]
    for bad in [(0, 64), (512, 0), (-1, None)]:
        with pytest.raises(ValueError):
            bucket_table(*bad)
    with pytest.raises(ValueError):
        square_table(0)


def test_exact_bucket_shapes_map_to_themselves() -> None:
    for table in (list(SDXL_BUCKETS_1024), bucket_table(512), bucket_table(256)):
        for index, (h, w) in enumerate(table):
            assert assign_bucket(h, w, table) == index
            assert assign_bucket(3 * h, 3 * w, table) == index  # scale does not matter
            assert aspect_error(h, w, table[index]) == pytest.approx(0.0, abs=1e-12)


def test_assignment_examples() -> None:
    table = list(SDXL_BUCKETS_1024)
    assert table[assign_bucket(1080, 1920, table)] == (768, 1344)  # 16:9 -> 0.5714
    assert table[assign_bucket(1920, 1080, table)] == (1344, 768)
    assert table[assign_bucket(600, 600, table)] == (1024, 1024)
    assert table[assign_bucket(1, 100, table)] == (512, 2048)  # beyond the range: the extreme bucket
    assert table[assign_bucket(100, 1, table)] == (2048, 512)
    assert assign_bucket(17, 9, square_table(256)) == 0
    assert aspect_error(100, 200, (100, 100)) == pytest.approx(math.log(2))
    assert aspect_error(200, 100, (100, 100)) == pytest.approx(math.log(2))


def test_exact_ties_go_to_the_lower_index() -> None:
    # a square image is exactly as far (log 2) from 1:2 as from 2:1
    assert assign_bucket(5, 5, [(1, 2), (2, 1)]) == 0
    assert assign_bucket(5, 5, [(2, 1), (1, 2)]) == 0
    assert assign_bucket(5, 5, [(2, 1), (1, 2), (3, 3)]) == 2
    # ratio 2/3 lies exactly between 4/9 and 1 in log space (sqrt(4/9 * 1) = 2/3)
    assert assign_bucket(2, 3, [(4, 9), (7, 7)]) == 0
    assert assign_bucket(2, 3, [(7, 7), (4, 9)]) == 0


@pytest.mark.parametrize("base", [1024, 512, 256])
def test_seeded_sweep_error_bounds(base: int) -> None:
    """Property sweep (hypothesis is not installed): nearest choice, and the error bound."""
    table = bucket_table(base)
    logs = [log_ratio(b) for b in table]  # ascending
    max_gap = max(b - a for a, b in zip(logs, logs[1:]))
    rng = random.Random(1234 + base)
    for _ in range(3000):
        # log-uniform aspect from 1:8 to 8:1 (twice the table's range), sizes 1..6000 pixels
        width = rng.randint(1, 6000)
        height = max(1, round(width * math.exp(rng.uniform(-math.log(8), math.log(8)))))
        chosen = assign_bucket(height, width, table)
        error = aspect_error(height, width, table[chosen])
        errors = [aspect_error(height, width, b) for b in table]
        assert error <= min(errors) + 1e-12  # it is the nearest bucket
        image_log = math.log(height / width)
        if image_log < logs[0]:
            assert chosen == 0 and error == pytest.approx(logs[0] - image_log, abs=1e-12)
        elif image_log > logs[-1]:
            assert chosen == len(table) - 1 and error == pytest.approx(image_log - logs[-1], abs=1e-12)
        else:
            assert error <= max_gap / 2 + 1e-12
            right = next(i for i, v in enumerate(logs) if v >= image_log)
            left = max(0, right - 1)
            assert error <= (logs[right] - logs[left]) / 2 + 1e-12  # half the local gap
            assert chosen in (left, right)


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        assign_bucket(0, 10, list(SDXL_BUCKETS_1024))
    with pytest.raises(ValueError, match="empty"):
        assign_bucket(10, 10, [])
    with pytest.raises(ValueError):
        aspect_error(10, -1, (1, 1))

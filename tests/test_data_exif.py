"""EXIF orientation: the recorded original size is the upright (h, w) in the loader and the cache.

Every sample is a JPEG stored 48 wide x 32 high with EXIF orientation 1..8, so 5..8 are upright
portraits (48 x 32, h x w). Three shard sets hold the same photos:
- `tool`: written by the shard tool (json size = stored pixels + `exif_orientation`);
- `old`: members written directly as shards from before the fix and img2dataset's skip_reencode
  ones hold them (json size = stored pixels, 3x larger, no `exif_orientation`);
- `reencoded`: img2dataset's usual output, pixels re-encoded without EXIF (stored = upright).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import fresh_tiny_model
from PIL import Image
from test_data_loader import write_shard

from sgm.data.decode import decode_image_oriented
from sgm.data.latent_cache import CacheConfig, cache_latents
from sgm.data.latent_loader import LatentLoader
from sgm.data.loader import BucketedLoader
from sgm.data.shards import build_shards, iter_folder

STORED_HW = (32, 48)
ORIENTATIONS = range(1, 9)
SCALE = 3  # the `old` set's json records an original 3x the stored size, as img2dataset's resize does


def stored_pixels(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*STORED_HW, 3), dtype=np.uint8))


def jpeg(orientation: int | None) -> bytes:
    """The stored 48 x 32 pixels as a JPEG, tagged with `orientation` (None: no EXIF at all)."""
    buffer = io.BytesIO()
    if orientation is None:
        stored_pixels(0).save(buffer, "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored_pixels(0).save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def upright(orientation: int, size: tuple[int, int] = STORED_HW) -> tuple[int, int]:
    return size[::-1] if orientation >= 5 else size


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict[str, tuple[Path, dict[str, tuple[int, int]]]]:
    """name -> (folder with one shard, caption -> the expected original_size_as_tuple)."""
    root = tmp_path_factory.mktemp("exif")
    photos = root / "photos"
    photos.mkdir()
    for n in ORIENTATIONS:
        (photos / f"o{n}.jpg").write_bytes(jpeg(n))
        (photos / f"o{n}.txt").write_text(f"orientation {n}")
    summary = build_shards(iter_folder(photos), root / "tool")
    assert summary.written == 8 and not summary.skipped
    old, reencoded = [], []
    for n in ORIENTATIONS:
        height, width = STORED_HW
        old_meta = {"key": f"o{n}", "original_width": width * SCALE, "original_height": height * SCALE}
        old += [(f"o{n}.jpg", jpeg(n)), (f"o{n}.json", json.dumps(old_meta).encode())]
        old.append((f"o{n}.txt", f"orientation {n}".encode()))
        new_meta = {"key": f"o{n}", "original_width": width, "original_height": height}
        reencoded += [(f"o{n}.jpg", jpeg(None)), (f"o{n}.json", json.dumps(new_meta).encode())]
        reencoded.append((f"o{n}.txt", f"orientation {n}".encode()))
    (root / "old").mkdir()
    (root / "reencoded").mkdir()
    write_shard(root / "old" / "00000.tar", old)
    write_shard(root / "reencoded" / "00000.tar", reencoded)
    scaled = (STORED_HW[0] * SCALE, STORED_HW[1] * SCALE)
    return {
        "tool": (root / "tool", {f"orientation {n}": upright(n) for n in ORIENTATIONS}),
        "old": (root / "old", {f"orientation {n}": upright(n, scaled) for n in ORIENTATIONS}),
        "reencoded": (root / "reencoded", {f"orientation {n}": STORED_HW for n in ORIENTATIONS}),
    }


def check_rows(batches, expected: dict[str, tuple[int, int]]) -> None:
    """Each sample's original size is the expected upright one, and its bucket has its orientation."""
    seen = {}
    for batch in batches:
        for i, caption in enumerate(batch["txt"]):
            original = tuple(batch["original_size_as_tuple"][i].tolist())
            target = tuple(batch["target_size_as_tuple"][i].tolist())
            assert original == expected[caption], caption
            assert (target[0] > target[1]) == (original[0] > original[1]), (caption, target)
            seen[caption] = original
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_decode_says_when_orientation_swapped_height_and_width(orientation: int) -> None:
    image, quarter_turned = decode_image_oriented(jpeg(orientation))
    assert quarter_turned == (orientation >= 5)
    assert (image.height, image.width) == upright(orientation)


def test_shard_tool_records_stored_size_and_orientation(shard_sets) -> None:
    folder, _ = shard_sets["tool"]
    with tarfile.open(folder / "00000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    for meta in metas:
        n = int(meta["caption"].split()[-1])
        assert (meta["original_height"], meta["original_width"]) == STORED_HW
        assert meta.get("exif_orientation", 1) == n


@pytest.mark.parametrize("name", ["tool", "old", "reencoded"])
def test_loader_records_the_upright_original_size(shard_sets, name: str) -> None:
    folder, expected = shard_sets[name]
    loader = BucketedLoader(str(folder / "*.tar"), batch_size=1, base_resolution=64, num_epochs=1, shuffle_buffer=0)
    batches = list(loader)
    check_rows(batches, expected)
    for batch in batches:  # the pixels are cropped to the bucket, so they are upright too
        assert tuple(batch["jpg"].shape[-2:]) == tuple(batch["target_size_as_tuple"][0].tolist())


def test_latent_cache_records_the_upright_original_size(shard_sets, tmp_path) -> None:
    model = fresh_tiny_model()
    config = CacheConfig(base_resolution=64, latent_mode="mean", crop="center")
    for name, (folder, expected) in shard_sets.items():
        summary = cache_latents(model, str(folder / "*.tar"), tmp_path / name, config, progress=False)
        assert summary.samples == 8 and not summary.bad, name
        check_rows(LatentLoader(str(tmp_path / name / "*.tar"), batch_size=1, num_epochs=1), expected)

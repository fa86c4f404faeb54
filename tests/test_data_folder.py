"""A folder of captioned images trains as `data=folder data.folder=DIR` (sgm/data/folder.py).

One nested folder holds JPEG, PNG with alpha and WebP images, an EXIF-rotated JPEG (orientation 6,
stored 96 wide x 64 high, so 96 x 64 (h x w) upright), images without captions, an image smaller
than the smallest bucket and a corrupt file; plus a hidden folder and a text file that are not
images. Buckets are the 256 px table (sides 128..512 in steps of 32; no-upscale minimum 128).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgm.data.buckets import assign_bucket, bucket_table, no_upscale_bucket, no_upscale_grid
from sgm.data.folder import FOLDER_MARKER, build_folder_shards, folder_loader, with_trigger
from sgm.data.loader import BucketedLoader
from sgm.data.samples import ImageProcessor
from sgm.data.stream import SlotStream, StreamConfig

BASE = 256
TABLE = bucket_table(BASE)
# relative path -> (upright (h, w), format, caption file text or None)
IMAGES = {
    "red.jpg": ((300, 400), "JPEG", "a red thing\n"),
    "sub/alpha.png": ((320, 256), "PNG", None),
    "sub/deeper/pic.WEBP": ((288, 288), "WEBP", "  a webp picture  "),
    "sub/rotated.jpeg": ((96, 64), "JPEG", "rotated photo"),  # stored 64 x 96 (h x w) with orientation 6
    "small.jpg": ((200, 200), "JPEG", None),
    "tiny.png": ((40, 60), "PNG", "tiny"),
    "big.jpg": ((600, 600), "JPEG", "big"),
}
CORRUPT = "sub/broken.jpg"


def encode(height: int, width: int, fmt: str, seed: int, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, rng.integers(0, 256, (height, width))], -1).astype(np.uint8)
    image = Image.fromarray(rgb)
    if fmt == "PNG":
        image = Image.fromarray(np.concatenate([rgb, np.full((height, width, 1), 128, np.uint8)], -1), "RGBA")
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, fmt, exif=exif.tobytes())
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def make_folder(root: Path) -> Path:
    for seed, (rel, ((height, width), fmt, caption)) in enumerate(IMAGES.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "sub/rotated.jpeg":  # stored landscape, shown portrait
            path.write_bytes(encode(width, height, fmt, seed, orientation=6))
        else:
            path.write_bytes(encode(height, width, fmt, seed))
        if caption is not None:
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "sub/broken.txt").write_text("broken")
    (root / ".hidden").mkdir()
    (root / ".hidden/skip.jpg").write_bytes(encode(64, 64, "JPEG", 99))
    (root / "notes.md").write_text("not an image")
    return root


def read_shards(shards: list[str]) -> dict[str, dict]:
    """source_path -> {"json", "txt", "ext"} over the given shards."""
    samples: dict[str, dict] = {}
    for shard in shards:
        members: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for parts in members.values():
            meta = json.loads(parts["json"])
            image_ext = next(e for e in parts if e not in ("json", "txt"))
            samples[meta["source_path"]] = {"json": meta, "txt": parts["txt"].decode(), "ext": image_ext}
    return samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return build_folder_shards(folder, cache=cache, trigger="sks"), cache


def test_build_writes_captions_trigger_default_and_sizes(built):
    result, cache = built
    assert result.built and result.path.parent == cache and result.path.name.startswith(f"{result.path.name[:-17]}-")
    samples = read_shards(result.shards)
    assert set(samples) == set(IMAGES)  # hidden folder, notes.md and the corrupt file are not samples
    assert result.images == len(IMAGES) + 1 and result.written == len(IMAGES)
    assert result.skipped == {"corrupt_image": 1}
    record = json.loads((result.path / FOLDER_MARKER).read_text())
    assert record["examples"] == {"corrupt_image": [CORRUPT]}
    assert samples["red.jpg"]["txt"] == "sks, a red thing"
    assert samples["sub/deeper/pic.WEBP"]["txt"] == "sks, a webp picture"
    assert samples["sub/alpha.png"]["txt"] == "sks"  # no caption: default "" plus the trigger
    assert samples["small.jpg"]["txt"] == "sks"
    assert {s["ext"] for s in samples.values()} == {"jpg", "png", "webp"}
    rotated = samples["sub/rotated.jpeg"]["json"]  # stored size + orientation, as img2dataset and our tool
    assert (rotated["original_height"], rotated["original_width"], rotated["exif_orientation"]) == (64, 96, 6)
    assert (samples["red.jpg"]["json"]["original_height"], samples["red.jpg"]["json"]["original_width"]) == (300, 400)


def test_default_caption_and_trigger_rules(folder, tmp_path):
    result = build_folder_shards(folder, cache=tmp_path, default_caption="a photo")
    samples = read_shards(result.shards)
    assert samples["sub/alpha.png"]["txt"] == "a photo" and samples["red.jpg"]["txt"] == "a red thing"
    assert with_trigger("sks, a dog", "sks") == "sks, a dog"
    assert with_trigger("a dog", " sks ") == "sks, a dog" and with_trigger("a dog", None) == "a dog"


def test_second_build_reuses_and_changes_rebuild(folder, tmp_path):
    first = build_folder_shards(folder, cache=tmp_path)
    mtimes = {p: os.stat(p).st_mtime_ns for p in first.shards}
    again = build_folder_shards(folder, cache=tmp_path)
    assert not again.built and again.path == first.path and again.shards == first.shards
    assert {p: os.stat(p).st_mtime_ns for p in again.shards} == mtimes  # nothing rewritten
    caption = folder / "red.txt"
    before = caption.read_text()
    stat = caption.stat()
    try:
        caption.write_text("a blue thing")
        changed = build_folder_shards(folder, cache=tmp_path)
        assert changed.built and changed.path != first.path
        assert read_shards(changed.shards)["red.jpg"]["txt"] == "a blue thing"
        caption.write_text(before)
        os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same text, new mtime
        assert build_folder_shards(folder, cache=tmp_path).path not in (first.path, changed.path)
        assert build_folder_shards(folder, cache=tmp_path, trigger="ohwx").path != first.path
    finally:
        caption.write_text(before)
        os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_folder_shards(folder, cache=tmp_path).path == first.path  # restored: reused again
    assert not list(tmp_path.glob(".*.tmp-*"))  # no temporary build left behind


def test_cache_inside_the_folder_is_not_scanned(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(encode(64, 64, "JPEG", 0))
    first = build_folder_shards(root, cache=root / "cache")
    assert build_folder_shards(root, cache=root / "cache").path == first.path
    other = build_folder_shards(root, cache=tmp_path / "elsewhere")  # a build of ours inside: skipped too
    assert other.path.name == first.path.name and other.written == 1


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p / "missing", "data.folder=.*does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "data.folder=.*is not a folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "data.folder=.*holds no images"),
    ],
)
def test_unusable_folder_names_data_folder(tmp_path, setup, match):
    with pytest.raises(ValueError, match=match):
        build_folder_shards(setup(tmp_path), cache=tmp_path / "cache")


def test_all_corrupt_and_bad_repeats_are_clear(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"data.folder=.*none of its 1 images can be used \(corrupt_image=1"):
        build_folder_shards(tmp_path / "imgs", cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="data.repeats must be an integer >= 1"):
        folder_loader(str(tmp_path / "imgs"), repeats=0, batch_size=1)
    with pytest.raises(ValueError, match="data.folder is not set"):
        folder_loader(None, batch_size=1)


def epoch_keys(loader: BucketedLoader) -> list[str]:
    return [key for batch in loader for key in batch["__key__"]]


def test_repeats_multiply_samples_per_pass(built):
    result, cache = built
    options = {"batch_size": 2, "num_epochs": 1, "base_resolution": BASE, "shuffle_buffer": 8, "num_workers": 0}
    once = folder_loader(shards=result.shards, repeats=1, **options)
    thrice = folder_loader(shards=result.shards, repeats=3, **options)
    assert thrice.config.shards == tuple(result.shards) * 3
    assert thrice.fingerprint()["shards"]["count"] == 3 * len(result.shards)
    keys_once, keys_thrice = epoch_keys(once), epoch_keys(thrice)
    assert sorted(keys_once) == sorted(set(keys_once)) and len(keys_once) == result.written
    assert sorted(keys_thrice) == sorted(keys_once * 3)


def test_repeats_split_over_slots_and_resume_exactly(built):
    """Each repeat is its own shard position: 2 slots x 2 repeats read disjoint copies, and a stream
    continued from a mid-epoch snapshot yields what the uninterrupted one does."""
    result, _ = built
    processor = ImageProcessor(buckets=tuple(TABLE), bucket_no_upscale=True)
    config = StreamConfig(
        shards=tuple(result.shards) * 4, buckets=(), processor=processor, batch_size=2, shuffle_buffer=4, num_epochs=2
    )
    per_slot = []
    for slot in range(2):
        items = list(SlotStream(config, slot, 2))
        per_slot.append([k for batch, _ in items if batch for k in batch["__key__"]])
        middle = next(snap for batch, snap in items[2:] if batch)
        index = [snap for _, snap in items].index(middle)
        resumed = list(SlotStream(config, slot, 2, json.loads(json.dumps(middle))))
        tail = [k for batch, _ in items[index + 1 :] if batch for k in batch["__key__"]]
        assert [k for batch, _ in resumed if batch for k in batch["__key__"]] == tail
    assert sorted(per_slot[0] + per_slot[1]) == sorted(read_keys(result.shards) * 8)  # 4 repeats x 2 epochs
    assert abs(len(per_slot[0]) - len(per_slot[1])) <= 2 * result.written  # two of four copies each


def read_keys(shards: list[str]) -> list[str]:
    keys = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.partition(".")[0] for m in tar})
    return keys


def sizes_by_source(loader: BucketedLoader, shards: list[str]) -> dict[str, dict]:
    key_to_source = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    key_to_source[meta["key"]] = meta["source_path"]
    found = {}
    for batch in loader:
        assert batch["jpg"].shape[0] == batch["target_size_as_tuple"].shape[0]
        assert len({tuple(t) for t in batch["target_size_as_tuple"].tolist()}) == 1  # single-bucket batches
        for i, key in enumerate(batch["__key__"]):
            target = tuple(batch["target_size_as_tuple"][i].tolist())
            assert tuple(batch["jpg"].shape[2:]) == target
            found[key_to_source[key]] = {
                "target": target,
                "original": tuple(batch["original_size_as_tuple"][i].tolist()),
                "crop": tuple(batch["crop_coords_top_left"][i].tolist()),
            }
    return found


def test_no_upscale_buckets_and_micro_conditioning(built):
    result, _ = built
    options = {"batch_size": 1, "num_epochs": 1, "base_resolution": BASE, "num_workers": 0, "crop": "center"}
    no_upscale = sizes_by_source(folder_loader(shards=result.shards, **options), result.shards)
    upscale = sizes_by_source(folder_loader(shards=result.shards, bucket_no_upscale=False, **options), result.shards)
    multiple, min_side = no_upscale_grid(TABLE)
    assert (multiple, min_side) == (32, 128)
    for rel, ((height, width), _, _) in IMAGES.items():
        table_bucket = TABLE[assign_bucket(height, width, TABLE)]
        got, old = no_upscale[rel], upscale[rel]
        assert got["original"] == old["original"] == (height, width)  # upright (the rotated one too)
        assert old["target"] == table_bucket
        assert got["target"] == no_upscale_bucket(height, width, table_bucket, multiple, min_side)
        if height >= table_bucket[0] and width >= table_bucket[1]:  # large: the normal bucket
            assert got == old
        elif min(height, width) >= min_side:  # small: a smaller bucket inside the image
            assert got["target"][0] <= height and got["target"][1] <= width and min(got["target"]) >= min_side
            assert got["target"] != table_bucket
        else:  # smaller than the smallest bucket: the smallest bucket of its aspect
            assert min(got["target"]) == min_side
        resized = _covering(height, width, got["target"])
        assert got["crop"] == ((resized[0] - got["target"][0]) // 2, (resized[1] - got["target"][1]) // 2)
    assert no_upscale["small.jpg"]["target"] == (192, 192) and no_upscale["tiny.png"]["target"] == (128, 192)
    assert no_upscale["sub/rotated.jpeg"]["target"] == (192, 128)  # upright portrait, 1.5:1 like its bucket


def _covering(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    from sgm.data.crop import covering_size

    return covering_size(height, width, *target)


def test_no_upscale_bucket_rule():
    assert no_upscale_bucket(2000, 3000, (832, 1216), 64, 256) == (832, 1216)  # covers: kept
    # scale 600/832: 600 -> 576 (nearest, not past the image), 877 -> 896 (nearest, inside 900)
    assert no_upscale_bucket(600, 900, (832, 1216), 64, 256) == (576, 896)
    assert no_upscale_bucket(600, 880, (832, 1216), 64, 256) == (576, 832)  # 896 would pass the image's 880
    assert no_upscale_bucket(100, 150, (832, 1216), 64, 256) == (256, 384)  # below the minimum: the smallest
    assert no_upscale_bucket(96, 64, (320, 224), 32, 128) == (192, 128)  # same aspect as the bucket's
    assert no_upscale_grid(bucket_table(1024)) == (64, 256) and no_upscale_grid([(256, 256)]) == (64, 256)
    assert no_upscale_grid(bucket_table(128)) == (32, 64)


def test_no_upscale_fingerprint_only_when_on(built):
    result, _ = built
    off = BucketedLoader(result.shards, batch_size=2, base_resolution=BASE)
    plain = BucketedLoader(result.shards, batch_size=2, base_resolution=BASE, bucket_no_upscale=False)
    on = BucketedLoader(result.shards, batch_size=2, base_resolution=BASE, bucket_no_upscale=True)
    assert off.fingerprint() == plain.fingerprint() and "processor" not in off.fingerprint()
    assert on.fingerprint()["processor"]["bucket_no_upscale"] is True
    with pytest.raises(ValueError, match="cannot resume the data loader exactly"):
        on.load_state_dict(off.state_dict())


def test_config_composes_and_instantiates(folder, tmp_path):
    from hydra.utils import instantiate
    from training_utils import compose_train

    from sgm.training.preflight import ConfigError, check_config, check_data

    base = ["~experiment", "name=folder_check", "data=folder", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"^data\.folder: not set"):
        check_config(compose_train(base))
    cache = tmp_path / "cache"
    cfg = compose_train(base + [f"data.folder={folder}", f"data.folder_cache={cache}", "data.num_workers=0"])
    check_config(cfg)
    assert cfg.data.repeats == 1 and cfg.data.bucket_no_upscale is True and cfg.data.default_caption == ""
    check_data(cfg)  # builds once, in the launching process
    (built,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    loader = instantiate(cfg.data)(rank=0, world_size=1)
    assert list(loader.config.shards) == sorted(str(p) for p in built.glob("*.tar"))
    batch = next(iter(loader))
    assert batch["jpg"].shape[0] == cfg.data.batch_size
    missing = compose_train(base + [f"data.folder={tmp_path / 'nothing'}", f"data.folder_cache={cache}"])
    with pytest.raises(ConfigError, match=r"^data: data\.folder=.*does not exist"):
        check_data(missing)


@pytest.mark.parametrize("lock", [True, False])
def test_concurrent_builds_agree(folder, tmp_path, monkeypatch, lock):
    """Builds started at once (ranks, runs) end with one complete cache: serialised by the lock, or
    without a working lock, the first rename wins and the others use it."""
    import contextlib
    import threading

    import sgm.data.folder as folder_module

    if not lock:
        monkeypatch.setattr(folder_module, "file_lock", lambda path: contextlib.nullcontext())
    barrier, results = threading.Barrier(3), []

    def build() -> None:
        barrier.wait()
        results.append(build_folder_shards(folder, cache=tmp_path, verbose=False))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len({r.path for r in results}) == 1
    assert all(os.path.isfile(p) for p in results[0].shards)
    if lock:
        assert sum(r.built for r in results) == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [results[0].path.name]


def test_build_reports_progress_and_skips(folder, tmp_path, monkeypatch, caplog):
    import logging

    import sgm.data.folder as folder_module

    monkeypatch.setattr(folder_module, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="sgm.data.folder"):
        build_folder_shards(folder, cache=tmp_path)
    text = caplog.text
    assert f"data.folder: {len(IMAGES) + 1}/{len(IMAGES) + 1} images (" in text and "img/s" in text
    assert f"skipped 1 image(s): corrupt_image=1 (e.g. {CORRUPT})" in text

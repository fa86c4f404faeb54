"""The webdataset loader: shard lists, slot splits, homogeneous bucketed batches, bad input.

Shards are written here with tarfile in img2dataset's layout (<key>.jpg/png + .txt + .json with
original_width/original_height); the json claims an original 3x the stored size, as img2dataset
does when it stores a downscaled copy, so recorded sizes must come from the json.
Helpers here are shared by test_data_resume.py and test_data_loader_distributed.py.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgm.data.buckets import bucket_table
from sgm.data.crop import covering_size
from sgm.data.decode import decode_image
from sgm.data.loader import BucketedLoader, TooManyBadSamples
from sgm.data.shard_list import expand_shards, iter_shard, local_tar_path, num_slots_for, slot_shards
from sgm.data.stream import SlotStream, StreamConfig

ORIGINAL_SCALE = 3
SHAPES = [(96, 128), (128, 96), (64, 128), (128, 64), (100, 100), (72, 160), (160, 72), (90, 120)]
CC12M = Path("/work/shared/data/cc12m-train-0000.tar")


def image_bytes(height: int, width: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A smooth gradient plus noise, so crops at different places differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sample_members(key: str, height: int, width: int, seed: int, fmt: str = "JPEG") -> list[tuple[str, bytes]]:
    """img2dataset's members for one sample: image, json (original 3x the stored size), txt."""
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    meta = {
        "key": key,
        "caption": f"caption {key}",
        "width": width,
        "height": height,
        "original_width": width * ORIGINAL_SCALE,
        "original_height": height * ORIGINAL_SCALE,
    }
    return [
        (f"{key}.{ext}", image_bytes(height, width, seed, fmt)),
        (f"{key}.json", json.dumps(meta).encode()),
        (f"{key}.txt", f"caption {key}".encode()),
    ]


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return str(path)


def make_dataset(
    root: Path,
    shard_sizes: list[int],
    shapes: list[tuple[int, int]] = SHAPES,
    extra: dict[int, list[tuple[str, bytes]]] | None = None,
) -> dict[str, dict]:
    """Shards root/shard-{i}.tar (plus `extra` members at the end of shard i); returns
    key -> {"shard", "stored" (h, w), "original" (h, w), "image"} for the regular samples."""
    info: dict[str, dict] = {}
    seed = 0
    for shard, size in enumerate(shard_sizes):
        members = []
        for index in range(size):
            key = f"s{shard}k{index:03d}"
            height, width = shapes[seed % len(shapes)]
            fmt = "PNG" if seed % 5 == 4 else "JPEG"
            sample = sample_members(key, height, width, seed, fmt)
            members += sample
            info[key] = {
                "shard": shard,
                "stored": (height, width),
                "image": sample[0][1],
                "original": (height * ORIGINAL_SCALE, width * ORIGINAL_SCALE),
            }
            seed += 1
        write_shard(root / f"shard-{shard}.tar", members + (extra or {}).get(shard, []))
    return info


def stream_config(root: Path, num_shards: int, **overrides) -> StreamConfig:
    options = {"batch_size": 2, "buckets": tuple(bucket_table(128)), "shuffle_buffer": 4, "num_epochs": 1}
    options["seed"] = 3
    options.update(overrides)
    shards = tuple(str(root / f"shard-{i}.tar") for i in range(num_shards))
    return StreamConfig(shards=shards, **options)


def collect_keys(stream: SlotStream) -> list[str]:
    return [key for batch, _ in stream if batch is not None for key in batch["__key__"]]


# -- buckets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("base", "low", "high"), [(1024, 0.90, 1.0), (512, 0.93, 1.13), (256, 0.93, 1.13)])
def test_bucket_areas_are_balanced_so_ranks_step_in_similar_time(base: int, low: float, high: float) -> None:
    """loader.py relies on this: ranks train different buckets at the same step."""
    areas = [h * w / base**2 for h, w in bucket_table(base)]
    assert low <= min(areas) and max(areas) <= high, (min(areas), max(areas))
    assert max(areas) / min(areas) < 1.21


# -- shard lists -----------------------------------------------------------------------------------
def test_expand_shards_braces_globs_urls_and_missing_files(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"shards-{i:05d}.tar").write_bytes(b"")
    braces = expand_shards(str(tmp_path / "shards-{00000..00002}.tar"))
    assert braces == [str(tmp_path / f"shards-{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "shards-*.tar")) == braces
    assert expand_shards([braces[0], "pipe:cat x.tar", "https://host/a-{0..1}.tar"]) == [
        braces[0],
        "pipe:cat x.tar",
        "https://host/a-0.tar",
        "https://host/a-1.tar",
    ]
    with pytest.raises(ValueError, match=r"2 shard file\(s\) do not exist: .*shards-00003.tar.*shards-00004.tar"):
        expand_shards(str(tmp_path / "shards-{00000..00004}.tar"))
    with pytest.raises(ValueError, match="matches no file"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="pipe:aws s3 cp s3://bucket/a.tar -"):
        expand_shards("s3://bucket/a.tar")
    with pytest.raises(ValueError, match="empty"):
        expand_shards([])


def test_epoch_orders_differ_and_slots_partition_shards() -> None:
    orders = {tuple(slot_shards(10, 0, epoch, 0, 1)[0]) for epoch in range(5)}
    assert len(orders) == 5 and all(sorted(order) == list(range(10)) for order in orders)
    parts = [slot_shards(10, 0, 2, slot, 4) for slot in range(4)]
    assert not any(stride for _, stride in parts)
    assert sorted(i for shards, _ in parts for i in shards) == list(range(10))
    assert slot_shards(3, 0, 0, 5, 6)[1] is True  # fewer shards than slots: stride samples
    assert num_slots_for(3, 0) == 3 and num_slots_for(2, 4) == 8


# -- slot splits -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 1), (2, 3), (3, 4)])
def test_slots_are_disjoint_and_complete_over_an_epoch(tmp_path: Path, world: int, workers: int) -> None:
    info = make_dataset(tmp_path, [7, 5, 9, 4])
    config = stream_config(tmp_path, 4)
    num_slots = num_slots_for(world, workers)
    seen: Counter[str] = Counter()
    for rank in range(world):
        for worker in range(max(workers, 1)):
            seen.update(collect_keys(SlotStream(config, rank * max(workers, 1) + worker, num_slots)))
    assert seen == Counter(list(info))  # each key exactly once


# -- batches ---------------------------------------------------------------------------------------
def test_batches_are_homogeneous_with_true_sizes_and_crops(tmp_path: Path) -> None:
    info = make_dataset(tmp_path, [12, 12])
    loader = BucketedLoader(
        str(tmp_path / "shard-{0..1}.tar"),
        batch_size=3,
        base_resolution=128,
        shuffle_buffer=5,
        flip_probability=0.5,
        num_epochs=1,
        seed=1,
    )
    keys, flipped = [], 0
    for batch in loader:
        b = len(batch["__key__"])
        height, width = (int(v) for v in batch["target_size_as_tuple"][0])
        assert batch["jpg"].dtype.is_floating_point is False and batch["jpg"].shape == (b, 3, height, width)
        assert (batch["target_size_as_tuple"] == batch["target_size_as_tuple"][0]).all()
        assert (height, width) in bucket_table(128)
        for i, key in enumerate(batch["__key__"]):
            keys.append(key)
            assert batch["txt"][i] == f"caption {key}"
            assert tuple(batch["original_size_as_tuple"][i].tolist()) == info[key]["original"]
            top, left = batch["crop_coords_top_left"][i].tolist()
            resized_h, resized_w = covering_size(*info[key]["stored"], height, width)
            assert 0 <= top <= resized_h - height and 0 <= left <= resized_w - width
            # The pixels are the recorded crop of the resized image, or of its mirror when flipped.
            resized = decode_image(info[key]["image"]).resize((resized_w, resized_h), Image.Resampling.BICUBIC)
            plain = np.asarray(resized)[top : top + height, left : left + width]
            mirror = np.asarray(resized)[:, ::-1][top : top + height, left : left + width]
            got = batch["jpg"][i].permute(1, 2, 0).numpy()
            assert np.array_equal(got, plain) or np.array_equal(got, mirror)
            flipped += not np.array_equal(got, plain)
    assert sorted(keys) == sorted(info) and 0 < flipped < len(keys)
    assert loader.bad_counts() == {} and loader.samples_seen() == len(info)
    assert [key for batch in loader for key in batch["__key__"]] == keys  # a finite loader starts over


def test_square_table_and_epoch_length_continue_one_stream(tmp_path: Path) -> None:
    make_dataset(tmp_path, [6, 6])
    shards = [str(tmp_path / f"shard-{i}.tar") for i in range(2)]
    options = {"batch_size": 2, "square_size": 64, "shuffle_buffer": 3, "seed": 5}
    endless = BucketedLoader(shards, **options)
    reference = [batch for batch, _ in zip(endless, range(10))]
    assert all(batch["jpg"].shape == (2, 3, 64, 64) for batch in reference)
    loader = BucketedLoader(shards, batches_per_epoch=4, **options)
    assert len(loader) == 4
    keys = [batch["__key__"] for _ in range(2) for batch in loader] + [b["__key__"] for b in loader][:2]
    assert keys == [batch["__key__"] for batch in reference]  # later epochs continue the stream
    with pytest.raises(ValueError, match="exactly one of data.base_resolution"):
        BucketedLoader(shards, batch_size=2, square_size=64, base_resolution=128)
    with pytest.raises(TypeError, match="batches_per_epoch"):
        len(endless)


def test_aesthetic_score_passes_through_with_a_default(tmp_path: Path) -> None:
    """LAION's key spellings are read; NaN or absent takes the default; no default: no key."""
    extras = {
        "laion": {"aesthetic_score": 6.25},
        "upper": {"AESTHETIC_SCORE": 4.5},
        "short": {"aesthetic": 5.5},
        "nan": {"aesthetic_score": float("nan")},
        "none": {},
    }
    members = []
    for seed, (key, extra) in enumerate(extras.items()):
        image, meta, caption = sample_members(key, 48, 48, seed=seed)
        members += [image, (meta[0], json.dumps({**json.loads(meta[1]), **extra}).encode()), caption]
    shard = write_shard(tmp_path / "scores.tar", members)

    def scores(**options) -> dict:
        loader = BucketedLoader(shard, batch_size=1, square_size=32, num_epochs=1, shuffle_buffer=0, **options)
        return {b["__key__"][0]: b["aesthetic_score"].tolist() if "aesthetic_score" in b else None for b in loader}

    assert scores(default_aesthetic_score=5.0) == {
        "laion": [6.25],
        "upper": [4.5],
        "short": [5.5],
        "nan": [5.0],
        "none": [5.0],
    }
    assert scores() == {"laion": [6.25], "upper": [4.5], "short": [5.5], "nan": None, "none": None}
    whole = next(iter(BucketedLoader(shard, batch_size=5, square_size=32, num_epochs=1)))
    assert "aesthetic_score" not in whole  # a batch with an unscored sample and no default


# -- bad input -------------------------------------------------------------------------------------
def bad_shards(root: Path) -> tuple[list[str], set[str]]:
    """A shard of planted bad samples, a tar cut mid-member, and a file that is not a tar."""
    good = [sample_members(f"good{i}", *SHAPES[i], seed=i) for i in range(4)]
    jpg = image_bytes(64, 64, seed=9)
    members = good[0] + good[1]
    for key, image in [
        ("empty", b""),
        ("corrupt", jpg[:300] + bytes(500) + jpg[800:]),
        ("random", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        ("bomb", png_header(50_000, 50_000)),
    ]:
        members += [(f"{key}.jpg", image), (f"{key}.txt", b"x")]
    zero_size = b'{"original_width": 0, "original_height": 0}'  # the image's defect is counted, not the json's
    members += [("emptyzero.jpg", b""), ("emptyzero.txt", b"x"), ("emptyzero.json", zero_size)]
    members += [("nocap.jpg", jpg), ("nocap.json", b"{}")]
    members += [("badjson.jpg", jpg), ("badjson.txt", b"x"), ("badjson.json", b"{not json")]
    members += [("noimage.txt", b"x"), ("noimage.json", b"{}")]
    members += [("dup.jpg", jpg), ("dup.jpg", jpg), ("dup.txt", b"x")]
    members += [("latin1.jpg", jpg), ("latin1.txt", "café".encode("latin-1"))]
    nan_size = b'{"original_width": NaN, "original_height": 5}'
    members += [("nansize.jpg", jpg), ("nansize.txt", b"x"), ("nansize.json", nan_size)]
    planted = write_shard(root / "planted.tar", members)
    whole = write_shard(root / "whole.tar", good[2] + good[3] + sample_members("lost", 64, 64, seed=7))
    data = Path(whole).read_bytes()
    cut = data.index(b"lost.jpg") + 512 + 100  # inside the image data of the third sample
    (root / "cut.tar").write_bytes(data[:cut])
    (root / "notatar.tar").write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    shards = [planted, str(root / "cut.tar"), str(root / "notatar.tar")]
    return shards, {f"good{i}" for i in range(4)}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb), with empty data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


PLANTED = {
    "empty_file": 2,
    "corrupt_image": 1,
    "unknown_format": 1,
    "too_many_pixels": 1,
    "missing_caption": 1,
    "bad_json": 2,
    "missing_image": 1,
    "truncated_tar": 1,
    "unreadable_shard": 1,
    "duplicate_member": 1,
    "bad_caption": 1,
}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_input_is_skipped_and_counted_exactly(tmp_path: Path, workers: int) -> None:
    shards, good = bad_shards(tmp_path)
    loader = BucketedLoader(
        shards,
        batch_size=1,
        square_size=32,
        num_workers=workers,
        num_epochs=1,
        max_bad_fraction=1.0,
        min_seen_for_check=0,
    )
    keys = [key for batch in loader for key in batch["__key__"]]
    assert sorted(keys) == sorted(good)
    assert loader.bad_counts() == PLANTED
    assert loader.samples_seen() == len(good) + sum(PLANTED.values())


def test_too_many_bad_samples_stop_with_the_counts_and_the_config_key(tmp_path: Path) -> None:
    shards, _ = bad_shards(tmp_path)
    loader = BucketedLoader(
        shards, batch_size=1, square_size=32, num_epochs=1, max_bad_fraction=0.2, min_seen_for_check=5
    )
    with pytest.raises(RuntimeError, match=r"data\.max_bad_fraction=0\.2.*") as info:
        list(loader)
    message = str(info.value)
    assert "could not be used (" in message and "raise data.max_bad_fraction" in message
    counted = dict(part.split("=") for part in message.split("(")[2].split(")")[0].split(", "))
    assert counted and set(counted) <= set(PLANTED)


def test_all_bad_endless_data_raises_instead_of_hanging(tmp_path: Path) -> None:
    members = [m for i in range(6) for m in sample_members(f"k{i}", 32, 32, seed=i) if not m[0].endswith(".txt")]
    shard = write_shard(tmp_path / "nocaptions.tar", members)
    loader = BucketedLoader(shard, batch_size=2, square_size=32, heartbeat_every=4, min_seen_for_check=10)
    signal.alarm(60)  # a hang fails the test instead of the whole run
    try:
        # each of the 6 samples counts once; the heartbeat after the whole first pass stops the run
        with pytest.raises(TooManyBadSamples, match=r"6 of 6 samples .*\(missing_caption=6\)"):
            next(iter(loader))
    finally:
        signal.alarm(0)


def tiny_hostile_shards(root: Path) -> list[str]:
    """2 shards x 4 samples: one with a corrupt JPEG and a missing caption, one cut inside its third
    sample (2 readable). 4 good samples, 3 bad things, all smaller than the default shuffle buffer."""
    jpg = image_bytes(32, 32, seed=9)
    first = [m for i in range(2) for m in sample_members(f"a{i}", 32, 32, seed=i)]
    first += [("corrupt.jpg", jpg[:300] + bytes(500) + jpg[800:]), ("corrupt.txt", b"x")]
    first += [("nocap.jpg", jpg), ("nocap.json", b"{}")]
    whole = write_shard(root / "whole.tar", [m for i in range(4) for m in sample_members(f"b{i}", 32, 32, seed=i)])
    data = Path(whole).read_bytes()
    (root / "b.tar").write_bytes(data[: data.index(b"b2.jpg") + 512 + 100])
    Path(whole).unlink()
    return [write_shard(root / "a.tar", first), str(root / "b.tar")]


TINY_BAD = {"corrupt_image": 1, "missing_caption": 1, "truncated_tar": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_each_bad_sample_counts_once_however_often_a_tiny_dataset_is_read(tmp_path: Path, workers: int) -> None:
    shards = tiny_hostile_shards(tmp_path)
    loader = BucketedLoader(shards, batch_size=2, square_size=32, num_workers=workers, max_bad_fraction=1.0)
    batches = [batch["__key__"] for _, batch in zip(range(40), loader)]  # 80 samples: 20 passes of the 4 good
    assert loader.bad_counts() == TINY_BAD
    assert loader.samples_seen() == 4 + 2 + 1  # distinct samples read (good or bad) + the cut shard
    assert Counter(key for keys in batches for key in keys).keys() == {"a0", "a1", "b0", "b1"}
    if workers == 0:  # one slot sees all 4: never a sample twice in a batch
        assert all(len(set(keys)) == len(keys) for keys in batches)
    one = BucketedLoader(shards[1], batch_size=2, square_size=32, num_workers=2, max_bad_fraction=1.0)
    list(zip(range(10), one))  # 1 shard, 2 slots: both read it, one counts its cut
    assert one.bad_counts() == {"truncated_tar": 1}


def test_bad_fraction_stops_a_tiny_dataset_within_its_first_pass(tmp_path: Path) -> None:
    loader = BucketedLoader(tiny_hostile_shards(tmp_path), batch_size=2, square_size=32)  # every default
    trained = 0
    with pytest.raises(TooManyBadSamples) as info:
        for _ in loader:
            trained += 1
    assert trained <= 3  # the 4 good samples make 2 batches a pass; the stop comes with the first pass
    message = str(info.value)
    assert message.startswith("3 of 7 samples (42.9%) could not be used (corrupt_image=1, missing_caption=1,")
    assert "truncated_tar=1), more than data.max_bad_fraction=0.01" in message
    assert "raise data.max_bad_fraction" in message


def test_gross_excess_stops_from_100_samples_and_noise_below_the_limit_does_not(tmp_path: Path) -> None:
    def shard(name: str, bad: int) -> str:
        members = []
        for i in range(300):  # every 300 // bad-th sample lacks its caption
            keep = bad == 0 or i % (300 // bad) != 0
            members += [m for m in sample_members(f"k{i}", 32, 32, seed=i) if keep or not m[0].endswith(".txt")]
        return write_shard(tmp_path / name, members)

    grossly_bad = BucketedLoader(shard("bad.tar", 30), batch_size=4, square_size=32)  # 10%
    with pytest.raises(TooManyBadSamples, match=r"of 10\d samples .*judged early: over 5 x that in the first"):
        list(zip(range(75), grossly_bad))
    assert grossly_bad.samples_seen() < 110
    noisy = BucketedLoader(shard("fine.tar", 2), batch_size=4, square_size=32)  # 0.7%: no stop, at any point
    assert len(list(zip(range(150), noisy))) == 150 and noisy.bad_counts()["missing_caption"] >= 1


def test_no_sample_repeats_within_a_batch_when_the_dataset_has_enough(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "six.tar", [m for i in range(6) for m in sample_members(f"k{i}", 32, 32, seed=i)])
    loader = BucketedLoader(shard, batch_size=4, square_size=32)  # buffer 1000 >> 6 samples
    batches = [batch["__key__"] for _, batch in zip(range(60), loader)]
    assert all(len(set(keys)) == 4 for keys in batches)
    seen = Counter(key for keys in batches for key in keys)
    assert set(seen) == {f"k{i}" for i in range(6)} and max(seen.values()) - min(seen.values()) <= 2
    two = write_shard(tmp_path / "two.tar", [m for i in range(2) for m in sample_members(f"t{i}", 32, 32, seed=i)])
    small = [b["__key__"] for _, b in zip(range(5), BucketedLoader(two, batch_size=4, square_size=32))]
    assert all(len(keys) == 4 and set(keys) == {"t0", "t1"} for keys in small)  # too few: repeats, no hang


def test_slot_without_samples_raises_a_clear_error(tmp_path: Path) -> None:
    make_dataset(tmp_path, [2])
    config = stream_config(tmp_path, 1, num_epochs=None)
    with pytest.raises(RuntimeError, match="slot 3 of 4 read no sample in epoch 0"):
        next(iter(SlotStream(config, 3, 4)))


def test_min_size_filters_by_original_size(tmp_path: Path) -> None:
    info = make_dataset(tmp_path, [8])
    config = stream_config(tmp_path, 1, min_size=100 * ORIGINAL_SCALE, batch_size=1)
    keys = collect_keys(SlotStream(config, 0, 1))
    assert sorted(keys) == sorted(k for k, v in info.items() if min(v["original"]) >= 100 * ORIGINAL_SCALE)
    stream = SlotStream(config, 0, 1)
    *_, (_, snapshot) = iter(stream)
    assert snapshot["bad"] == {"too_small": len(info) - len(keys)}


# -- a real img2dataset shard ----------------------------------------------------------------------
@pytest.mark.skipif(not CC12M.exists(), reason=f"{CC12M} not present (real img2dataset shard)")
def test_real_cc12m_shard_records_json_original_sizes() -> None:
    with tarfile.open(CC12M) as tar:
        metas = {Path(m.name).stem: json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")}
    loader = BucketedLoader(
        str(CC12M), batch_size=1, base_resolution=256, num_epochs=1, shuffle_buffer=8, max_bad_fraction=1.0
    )
    count = 0
    for batch in loader:
        key = batch["__key__"][0]
        meta = metas[key]
        assert batch["original_size_as_tuple"][0].tolist() == [meta["original_height"], meta["original_width"]]
        assert tuple(batch["jpg"].shape[-2:]) == tuple(batch["target_size_as_tuple"][0].tolist())
        count += 1
    assert count + sum(loader.bad_counts().values()) == len(metas) and count > 0


def test_truncated_tar_keeps_complete_samples_and_drops_the_broken_one(tmp_path: Path) -> None:
    members = [m for i in range(3) for m in sample_members(f"k{i}", 32, 48, seed=i)]
    data = Path(write_shard(tmp_path / "whole.tar", members)).read_bytes()
    events: list[str] = []

    def keys(url: str) -> list[str]:
        return [sample["__key__"] for sample in iter_shard(url, lambda reason, detail: events.append(reason))]

    cut_in_json = data[: data.index(b"k1.json") + 512 + 10]  # k1's image is whole, its json is not
    (tmp_path / "a.tar").write_bytes(cut_in_json)
    assert keys(str(tmp_path / "a.tar")) == ["k0"]
    cut_in_next = data[: data.index(b"k2.jpg") + 512 + 10]  # k1 is complete, k2's first member breaks
    (tmp_path / "b.tar").write_bytes(cut_in_next)
    assert keys(str(tmp_path / "b.tar")) == ["k0", "k1"]
    assert keys("pipe:cat " + str(tmp_path / "whole.tar")) == ["k0", "k1", "k2"]
    (tmp_path / "empty.tar").write_bytes(b"")
    assert keys(str(tmp_path / "empty.tar")) == []
    assert events == ["truncated_tar", "truncated_tar", "unreadable_shard"]


def test_local_random_access_reader_matches_the_webdataset_stream_reader(tmp_path: Path) -> None:
    """Local .tar files take the random-access path; pipe: takes webdataset's: same samples, same events."""
    shards, _ = bad_shards(tmp_path)
    members = [m for i in range(3) for m in sample_members(f"k{i}", 32, 48, seed=i)]
    data = Path(write_shard(tmp_path / "whole.tar", members)).read_bytes()
    for name, end in [
        ("in_json", data.index(b"k1.json") + 512 + 10),
        ("in_next", data.index(b"k2.jpg") + 512 + 10),
        ("in_header", data.index(b"k2.jpg") + 100),
        ("in_padding", data.index(b"k0.json") + 512 + 40),
    ]:
        (tmp_path / f"cut_{name}.tar").write_bytes(data[:end])
        shards.append(str(tmp_path / f"cut_{name}.tar"))
    split_key = "d" * 60 + "/" + "k" * 80  # ustar's prefix field carries the folder: read by the fast path
    long_key = "sub/" + "k" * 300  # a pax (or GNU long-name) header: the fast reader hands over to tarfile
    for fmt, name in [(tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu"), (tarfile.USTAR_FORMAT, "ustar")]:
        with tarfile.open(tmp_path / f"{name}.tar", "w", format=fmt) as tar:
            directory = tarfile.TarInfo("adir")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for member, payload in (
                sample_members("plain", 32, 32, seed=1)
                + sample_members(split_key, 32, 32, seed=4)
                + (sample_members(long_key, 32, 32, seed=2) if fmt != tarfile.USTAR_FORMAT else [])
                + sample_members("after", 32, 32, seed=3)
            ):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        shards.append(str(tmp_path / f"{name}.tar"))
    assert local_tar_path(shards[0]) == shards[0] and local_tar_path("pipe:cat " + shards[0]) is None
    assert local_tar_path("file://" + shards[0]) == shards[0] and local_tar_path(shards[0] + ".gz") is None

    def read(url: str) -> tuple[list[dict], list[str]]:
        events: list[str] = []
        samples = list(iter_shard(url, lambda reason, detail: events.append(reason)))
        return [{k: v for k, v in s.items() if k != "__url__"} for s in samples], events

    for shard in shards:
        assert read(shard) == read("pipe:cat " + shard), shard
    keys = [sample["__key__"] for sample in read(str(tmp_path / "pax.tar"))[0]]
    assert keys == ["plain", split_key, long_key, "after"]
    assert [sample["__key__"] for sample in read(str(tmp_path / "ustar.tar"))[0]] == ["plain", split_key, "after"]

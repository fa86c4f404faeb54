"""Shard building: bytes kept, sizes and captions right, bad inputs counted, shards atomic."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data import build_shards as cli
from sgm.data.shards import (
    ShardError,
    ShardWriter,
    SourceItem,
    build_shards,
    describe_shards,
    iter_folder,
    iter_manifest,
)

CC12M = Path("/work/shared/data/cc12m-train-0000.tar")


def _encode(size: tuple[int, int], fmt: str, mode: str = "RGB", seed: int = 0) -> bytes:
    """A small noisy image (noise so that sizes and bytes differ between files)."""
    image = Image.effect_noise(size, 40 + seed).convert(mode) if mode != "RGBA" else Image.new(mode, size, (1, 2, 3, 4))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def make_folder(root: Path) -> dict[str, tuple[bytes, str, int, int, str]]:
    """Good and bad inputs; returns source_path -> (bytes, ext, width, height, caption) of the good ones."""
    good = {
        "a.jpg": (_encode((40, 30), "JPEG"), "jpg", 40, 30, "a grey noise photo"),
        "sub/b.png": (_encode((17, 50), "PNG", "RGBA"), "png", 17, 50, "a tall transparent square"),
        "c.webp": (_encode((64, 20), "WEBP", seed=1), "webp", 64, 20, "a wide webp, ünïcode caption"),
        "d.jpeg": (_encode((33, 33), "JPEG", seed=2), "jpg", 33, 33, "jpeg extension"),
        "really_png.jpg": (_encode((21, 13), "PNG", seed=3), "png", 21, 13, "a png named .jpg"),
    }
    for rel, (data, _, _, _, caption) in good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        (root / rel).with_suffix(".txt").write_text("\ufeff" + caption + "\n", encoding="utf-8")
    (root / "zero.jpg").write_bytes(b"")
    (root / "random.jpg").write_bytes(os.urandom(300))
    (root / "anim.gif").write_bytes(_encode((8, 8), "GIF"))
    (root / "blank.png").write_bytes(_encode((9, 9), "PNG"))
    for stem, text in (("zero", "x"), ("random", "x"), ("anim", "a gif"), ("blank", "  \n"), ("orphan", "o")):
        (root / f"{stem}.txt").write_text(text)
    (root / "nocap.png").write_bytes(_encode((5, 5), "PNG"))
    (root / "notes.md").write_text("not an image")
    (root / "a.json").write_text(json.dumps({"url": "http://x/a.jpg", "key": "old", "aesthetic_score": 6.25}))
    (root / "lost.json").write_text("{}")
    (root / "bad.png").write_bytes(_encode((6, 6), "PNG"))
    (root / "bad.txt").write_text("metadata broken")
    (root / "bad.json").write_text("[1, 2]")
    (root / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, not counted
    return good


FOLDER_SKIPS = Counter(
    empty_file=1,
    corrupt_image=1,
    unsupported_format=1,
    empty_caption=1,
    orphan_sidecar=2,
    missing_caption=1,
    unknown_extension=1,
    bad_sidecar_json=1,
)


def read_tar_samples(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} with plain tarfile; asserts no key appears twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                assert ext not in samples.setdefault(key, {}), f"{member.name} twice"
                samples[key][ext] = tar.extractfile(member).read()
    return samples


def check_samples(samples: dict[str, dict[str, bytes]], good: dict) -> None:
    """Every good input present once with identical bytes, true sizes and its caption."""
    by_source = {}
    for key, members in samples.items():
        meta = json.loads(members["json"])
        assert meta["key"] == key and len(key) == 9 and key.isdigit()
        assert meta["source_path"] not in by_source, f"{meta['source_path']} written twice"
        by_source[meta["source_path"]] = (members, meta)
    assert sorted(by_source) == sorted(good)
    for source, (data, ext, width, height, caption) in good.items():
        members, meta = by_source[source]
        assert set(members) == {ext, "txt", "json"}
        assert members[ext] == data, f"{source}: image bytes changed"
        with Image.open(io.BytesIO(members[ext])) as image:
            assert image.size == (width, height)
        assert (meta["original_width"], meta["original_height"]) == (width, height)
        assert members["txt"].decode() == caption == meta["caption"]


def test_folder_build_keeps_bytes_sizes_captions_and_counts_skips(tmp_path):
    good = make_folder(tmp_path / "images")
    out = tmp_path / "shards"
    summary = build_shards(iter_folder(tmp_path / "images"), out, samples_per_shard=2)

    assert summary.written == len(good)
    assert summary.skipped == FOLDER_SKIPS
    assert "random.jpg" in summary.examples["corrupt_image"] and "zero.jpg" in summary.examples["empty_file"]
    assert summary.examples["orphan_sidecar"] == ["lost.json", "orphan.txt"]
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"] == [p.name for p in summary.shards]
    assert not list(out.glob("*.tmp"))
    samples = read_tar_samples(shards)
    check_samples(samples, good)
    metas = {json.loads(m["json"])["source_path"]: json.loads(m["json"]) for m in samples.values()}
    assert metas["a.jpg"]["url"] == "http://x/a.jpg" and metas["a.jpg"]["aesthetic_score"] == 6.25  # sidecar json
    assert sorted(samples) == ["000000000", "000000001", "000010000", "000010001", "000020000"]

    stats = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(3)]
    assert [s["successes"] for s in stats] == [2, 2, 1]
    assert sum(s["failed"] for s in stats) == sum(FOLDER_SKIPS.values())
    assert all(s["count"] == s["successes"] + s["failed"] for s in stats)
    assert json.loads((out / "_build_summary.json").read_text())["skipped"] == dict(FOLDER_SKIPS)

    # The same shards through webdataset, as the loader reads them.
    seen = {}
    for sample in wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        seen[meta["source_path"]] = sample
        data, ext, _, _, caption = good[meta["source_path"]]
        assert sample[ext] == data and sample["txt"].decode() == caption
    assert sorted(seen) == sorted(good)


def write_manifest(root: Path, kind: str, good: dict) -> Path:
    rows = [{"path": rel, "caption": item[4], "aesthetic_score": 5.5 + i} for i, (rel, item) in enumerate(good.items())]
    rows[0]["path"] = str((root / rows[0]["path"]).resolve())  # an absolute path
    rows += [
        {"path": "gone.jpg", "caption": "deleted file", "aesthetic_score": 1},
        {"path": "zero.jpg", "caption": "empty file", "aesthetic_score": 1},
        {"path": "random.jpg", "caption": "", "aesthetic_score": 1},
        {"path": "", "caption": "no path", "aesthetic_score": 1},
    ]
    manifest = root / f"captions.{kind}"
    if kind == "csv":
        with open(manifest, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["path", "caption", "aesthetic_score"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        lines = [json.dumps(r) for r in rows] + ["", "{not json", json.dumps({"path": "nocap.png"}), "[1, 2]"]
        lines.append(json.dumps({"path": "d.jpeg", "caption": "lone \ud800 surrogate"}))
        manifest.write_bytes(("\n".join(lines) + "\n").encode() + b'{"path": "a.jpg", "caption": "\xff"}\n')
    return manifest


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_build(tmp_path, kind):
    root = tmp_path / "images"
    good = make_folder(root)
    manifest = write_manifest(root, kind, good)
    expected = dict(good.items())
    first = next(iter(good))
    expected[str((root / first).resolve())] = expected.pop(first)  # recorded as written in the manifest

    summary = build_shards(iter_manifest(manifest), tmp_path / "out", samples_per_shard=3)

    skips = Counter(missing_file=1, empty_file=1, empty_caption=1, bad_manifest_row=1)  # "" path: bad row
    if kind == "jsonl":  # plus a broken line, a list, a row without caption, a bad escape, a non-UTF-8 line
        skips.update(bad_manifest_row=3, missing_caption=1, bad_caption_encoding=1)
    assert summary.skipped == skips and summary.written == len(good)
    samples = read_tar_samples(sorted((tmp_path / "out").glob("*.tar")))
    check_samples(samples, expected)
    scores = sorted(json.loads(m["json"])["aesthetic_score"] for m in samples.values())
    assert scores == [5.5 + i for i in range(len(good))]  # extra columns reach the json, as numbers


def test_manifest_errors_are_clear(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,text\na.jpg,hi\n")
    with pytest.raises(ShardError, match="no column 'path'.*--path-column"):
        list(iter_manifest(bad))
    assert len(list(iter_manifest(bad, path_column="file", caption_column="text"))) == 1
    (tmp_path / "latin1.csv").write_bytes("path,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ShardError, match="not UTF-8"):
        iter_manifest(tmp_path / "latin1.csv")
    (tmp_path / "m.tsv").write_text("path\tcaption\n")
    with pytest.raises(ShardError, match=r"\.csv or \.jsonl"):
        list(iter_manifest(tmp_path / "m.tsv"))
    with pytest.raises(ShardError, match="does not exist"):
        list(iter_folder(tmp_path / "nope"))


def test_exif_orientation_recorded_sizes_as_stored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 30)).save(path, exif=exif)
    build_shards([SourceItem("phone.jpg", path, "a phone photo")], tmp_path / "out")
    meta = json.loads(read_tar_samples([tmp_path / "out" / "00000.tar"])["000000000"]["json"])
    assert (meta["original_width"], meta["original_height"], meta["exif_orientation"]) == (40, 30, 6)


def test_max_shard_bytes_respected(tmp_path):
    items = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_encode((64, 48), "PNG", seed=i))  # noise: about 9 KB each
        items.append(SourceItem(path.name, path, f"noise {i}"))
    limit = 40_000
    summary = build_shards(items, tmp_path / "out", samples_per_shard=1000, max_shard_bytes=limit)
    shards = sorted((tmp_path / "out").glob("*.tar"))
    assert len(shards) > 2 and summary.written == 12
    assert all(p.stat().st_size <= limit for p in shards)
    assert len(read_tar_samples(shards)) == 12


def test_samples_per_shard_and_key_width(tmp_path):
    data = _encode((8, 8), "PNG")
    with ShardWriter(tmp_path / "a", samples_per_shard=4) as writer:
        keys = [writer.write(data, "png", f"c{i}", 8, 8) for i in range(10)]
    assert keys == sorted(keys) and len(set(keys)) == 10 and keys[4] == "000010000"
    counts = describe_shards([tmp_path / "a"]).samples_per_shard
    assert list(counts.values()) == [4, 4, 2]
    with ShardWriter(tmp_path / "b", samples_per_shard=100_000) as writer:
        assert writer.write(data, "png", "c", 8, 8) == "0000000000"  # 5 + 5 digits


def test_crash_mid_shard_leaves_only_complete_shards(tmp_path):
    data = _encode((8, 8), "PNG")
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path / "w", samples_per_shard=3) as writer:
        for i in range(5):
            writer.write(data, "png", f"c{i}", 8, 8)
        raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["00000.tar", "00000_stats.json"]
    assert len(read_tar_samples([tmp_path / "w" / "00000.tar"])) == 3

    def items():  # a crash inside the build loop (e.g. the source disappears)
        for i in range(7):
            path = tmp_path / f"{i}.png"
            path.write_bytes(data)
            yield SourceItem(path.name, path, f"c{i}")
        raise OSError("disk vanished")

    with pytest.raises(OSError, match="disk vanished"):
        build_shards(items(), tmp_path / "b", samples_per_shard=3)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.tar*")) == ["00000.tar", "00001.tar"]
    assert len(read_tar_samples(sorted((tmp_path / "b").glob("*.tar")))) == 6


def test_output_folder_guard(tmp_path):
    make_folder(tmp_path / "images")
    build_shards(iter_folder(tmp_path / "images"), tmp_path / "out", samples_per_shard=1)
    (tmp_path / "out" / "00099.tar.tmp").write_bytes(b"partial")  # from a killed run
    with pytest.raises(ShardError, match="--overwrite"):
        build_shards(iter_folder(tmp_path / "images"), tmp_path / "out")
    summary = build_shards(iter_folder(tmp_path / "images"), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00000.tar",
        "00000_stats.json",
        "_build_summary.json",
    ]
    assert summary.written == 5


def test_describe_shards(tmp_path):
    good = make_folder(tmp_path / "images")
    build_shards(iter_folder(tmp_path / "images"), tmp_path / "out", samples_per_shard=2)
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 40)
    report = describe_shards([tmp_path / "out", tmp_path / "broken.tar"])
    assert report.samples == len(good) and report.shards == 4
    assert report.extensions == Counter(jpg=2, png=2, webp=1, txt=5, json=5)
    assert report.without_image == report.without_caption == 0
    assert len(report.errors) == 1 and "broken.tar" in report.errors[0]
    assert "5 samples" in report.format()


def test_describe_real_img2dataset_shard():
    if not CC12M.is_file():
        pytest.skip(f"{CC12M} not present (the shared sample of a real img2dataset shard)")
    report = describe_shards([CC12M])
    assert report.errors == [] and report.samples == 32
    assert report.extensions["jpg"] == report.extensions["txt"] == report.extensions["json"] == 32


def test_cli_build_and_check(tmp_path, capsys):
    make_folder(tmp_path / "images")
    out = tmp_path / "out"
    argv = [str(tmp_path / "images"), "--out", str(out), "--max-shard-bytes", "1M", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 samples in 1 shards, skipped 9" in printed and "corrupt_image: 1" in printed
    assert cli.main(["--check", str(out)]) == 0
    assert "5 samples" in capsys.readouterr().out
    assert cli.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.parse_size("500M") == 500_000_000 and cli.parse_size("1GiB") == 2**30 and cli.parse_size("12") == 12

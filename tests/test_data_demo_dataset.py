"""The demo dataset: real emoji, honest captions, many sizes and ratios, deterministic by seed."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
import unicodedata
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from sgm.data import demo_dataset as demo
from sgm.data.shards import ShardError

HAVE_FONT_PACKAGE = importlib.util.find_spec(demo.DEMO_MODULE) is not None
needs_font = pytest.mark.skipif(
    not HAVE_FONT_PACKAGE,
    reason=f"demo emoji source not installed: pip install {demo.DEMO_PACKAGE}=={demo.DEMO_PACKAGE_VERSION}",
)


def read_samples(out: Path) -> list[dict]:
    """Every sample of the shards in `out`, in order: key, ext, image bytes, caption, json."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                entry = samples.setdefault(key, {"key": key})
                if ext == "txt":
                    entry["caption"] = data.decode()
                elif ext == "json":
                    entry["meta"] = json.loads(data)
                else:
                    entry["ext"], entry["image"] = ext, data
    return list(samples.values())


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    if not HAVE_FONT_PACKAGE:
        pytest.skip(f"demo emoji source not installed: pip install {demo.DEMO_PACKAGE}=={demo.DEMO_PACKAGE_VERSION}")
    out = tmp_path_factory.mktemp("demo") / "a"
    summary = demo.build_demo_dataset(out, num_samples=96, seed=0, samples_per_shard=32)
    assert summary.written == 96 and len(summary.shards) == 3 and not summary.skipped
    return out


@needs_font
def test_same_seed_same_bytes_other_seed_differs(demo_out, tmp_path):
    demo.build_demo_dataset(tmp_path / "again", num_samples=96, seed=0, samples_per_shard=32)
    demo.build_demo_dataset(tmp_path / "other", num_samples=96, seed=1, samples_per_shard=32)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (demo_out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (demo_out / "00000.tar").read_bytes() != (tmp_path / "other" / "00000.tar").read_bytes()


@needs_font
def test_sizes_ratios_formats(demo_out):
    samples = read_samples(demo_out)
    ratios, exts = set(), set()
    for sample in samples:
        meta = sample["meta"]
        with Image.open(io.BytesIO(sample["image"])) as image:
            assert image.size == (meta["original_width"], meta["original_height"])  # saved at its own size
            assert image.format == {"png": "PNG", "jpg": "JPEG"}[sample["ext"]]
        width, height = image.size
        assert min(width, height) >= demo.MIN_SIDE and max(width, height) <= demo.MAX_SIDE
        ratios.add(round(height / width, 1))
        exts.add(sample["ext"])
    assert len(ratios) >= 5 and min(ratios) <= 0.5 and max(ratios) >= 2.0
    assert exts == {"png", "jpg"}
    small = [s for s in samples if max(s["meta"]["original_width"], s["meta"]["original_height"]) < 128]
    assert small, "no small images: small canvases must be stored small, not upscaled"
    assert all(len(s["image"]) < 20_000 for s in small)


@needs_font
def test_captions_are_honest(demo_out):
    samples = read_samples(demo_out)
    names = {s["meta"]["emoji_name"] for s in samples}
    assert len(names) == len(samples)  # the whole vocabulary is used before any emoji repeats
    for sample in samples:
        meta, caption = sample["meta"], sample["caption"]
        assert caption == meta["caption"]
        char = chr(int(meta["source_path"].split("#U+")[1], 16))
        assert unicodedata.name(char).lower() == meta["emoji_name"]
        article = "an" if meta["background"] == "orange" else "a"
        drawn = f"{meta['emoji_name']} emoji in {meta['foreground']} on {article} {meta['background']} background, "
        assert caption.startswith(drawn)
        top, left, box_h, box_w = meta["emoji_box_top_left_height_width"]
        height, width = meta["original_height"], meta["original_width"]
        assert top >= 0 and top + box_h <= height and left >= 0 and left + box_w <= width
        centre_y, centre_x = (top + box_h / 2) / height, (left + box_w / 2) / width
        place = caption.rsplit(", ", 1)[1]
        assert place.startswith(("at the ", "in the centre"))
        if "top" in place:
            assert centre_y < 1 / 3
        if "bottom" in place:
            assert centre_y >= 2 / 3
        if "left" in place:
            assert centre_x < 1 / 3
        if place == "in the centre":
            assert 1 / 3 <= centre_y < 2 / 3 and 1 / 3 <= centre_x < 2 / 3
        # The pixel at the emoji's box is not all background: something was drawn there.
        with Image.open(io.BytesIO(sample["image"])) as image:
            box = image.convert("L").crop((left, top, left + box_w, top + box_h))
            assert box.getextrema()[1] - box.getextrema()[0] > 40


@needs_font
def test_readable_by_webdataset_and_vocab_limit(demo_out, tmp_path):
    urls = [str(p) for p in sorted(demo_out.glob("*.tar"))]
    count = sum(1 for sample in wds.WebDataset(urls, shardshuffle=False) if sample["txt"] and sample["json"])
    assert count == 96
    demo.build_demo_dataset(tmp_path / "few", num_samples=20, seed=0, num_emoji=4)
    assert len({s["meta"]["emoji_name"] for s in read_samples(tmp_path / "few")}) == 4


def test_image_folder_source(tmp_path):
    """A folder of emoji images named by code point (Twemoji/Noto PNG style) works without the font package."""
    src = tmp_path / "pngs"
    src.mkdir()
    for name, colour in (("1f600.png", "yellow"), ("emoji_u2764.png", "red"), ("1f468-200d-1f469.png", "blue")):
        image = Image.new("RGBA", (72, 72), (0, 0, 0, 0))
        image.paste(colour, (10, 20, 60, 50))
        image.save(src / name)
    (src / "readme.png").write_bytes(b"not named by code point")
    summary = demo.build_demo_dataset(tmp_path / "out", num_samples=9, seed=3, source=src, samples_per_shard=4)
    assert summary.written == 9 and len(summary.shards) == 3
    captions = [s["caption"] for s in read_samples(tmp_path / "out")]
    assert {c.split(" emoji")[0] for c in captions} == {"grinning face", "heavy black heart", "man, woman"}
    assert all(" emoji on a" in c for c in captions)  # drawn in their own colours: no colour claimed


def test_missing_source_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ShardError, match="does not exist"):
        demo.build_demo_dataset(tmp_path / "out", source=tmp_path / "nope.ttf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="neither"):
        demo.build_demo_dataset(tmp_path / "out", source=tmp_path / "empty")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ShardError, match=f"pip install {demo.DEMO_PACKAGE}=="):
        demo.default_source()

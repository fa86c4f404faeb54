"""The default demo dataset: real emoji, captioned with their Unicode names, in many sizes.

Built by `python data/build_demo_dataset.py` and, when a run's config asks for it (`demo_data`), by
`python train.py` itself (sgm.training.run.ensure_demo_data).

The glyphs come from the Noto Emoji font (SIL OFL 1.1) that the PyPI package `manimgx-fonts`
ships, so a fresh machine needs nothing but pip. Each sample draws one emoji in a named colour on
a plain canvas of another named colour (an emoji whose name holds a colour, "blue heart", is
drawn in that colour); canvases range over 48..768 px sides and 11 aspect ratios
(1:3 .. 3:1), are saved at their own size (small ones stay small) as PNG or JPEG, and the caption
says what is there: "grinning face emoji in red on a white background, at the top left".
`source` (--source) also takes a font file or a folder of emoji images named by code point (`1f600.png`,
`emoji_u1f600.png`, `1f468-200d-1f469.png`, e.g. Twemoji/Noto PNGs), drawn in their own colours.
Everything follows from the seed: the same seed, Python and Pillow give byte-identical shards.
"""

from __future__ import annotations

import importlib.util
import io
import math
import random
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sgm.data.shards import BuildSummary, ShardError, ShardWriter, prepare_output_dir, write_json_atomic

DEMO_PACKAGE, DEMO_PACKAGE_VERSION, DEMO_MODULE = "manimgx-fonts", "2026.9.26.post1", "manimgx_fonts"
FONT_GLOB = "NotoEmoji*.ttf"
# (h, w): 1:3 .. 3:1, so bucketing has tall, square and wide images to sort.
ASPECT_RATIOS = ((1, 3), (1, 2), (9, 16), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9), (2, 1), (3, 1))
MIN_SIDE, MAX_SIDE = 48, 768
COLOURS = {
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "red": (215, 38, 38),
    "orange": (245, 140, 30),
    "yellow": (250, 214, 40),
    "green": (40, 150, 60),
    "teal": (30, 160, 160),
    "blue": (40, 80, 215),
    "purple": (130, 60, 180),
    "pink": (245, 130, 180),
    "brown": (120, 75, 40),
}
EMOJI_RANGES = ((0x2300, 0x2400), (0x2600, 0x27C0), (0x2B00, 0x2C00), (0x1F000, 0x1FB00))
# Skin-tone swatches are meaningless in a one-colour font; regional indicators draw as plain letters.
EXCLUDED = {*range(0x1F3FB, 0x1F400), *range(0x1F1E6, 0x1F200)}
JOINERS = {0x200D, 0xFE0E, 0xFE0F}


@dataclass(frozen=True)
class Emoji:
    """One drawable emoji: its text (font source) or image file, and its caption name."""

    name: str
    text: str = ""
    image_path: Path | None = None

    @property
    def source(self) -> str:
        return self.image_path.name if self.image_path else "U+" + "-".join(f"{ord(c):04X}" for c in self.text)


def default_source() -> Path:
    """The Noto Emoji font inside the installed demo package, or one clear error saying how to get it."""
    spec = importlib.util.find_spec(DEMO_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ShardError(
            f"the demo dataset draws emoji from the Noto Emoji font in the PyPI package {DEMO_PACKAGE}; "
            f"install it with `pip install {DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION}` or pass --source FONT_OR_DIR"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_emoji(source: str | Path) -> tuple[list[Emoji], Path | None]:
    """The emoji a source offers (sorted by code point) and the font file when it is a font."""
    source = Path(source)
    if source.is_dir():
        fonts = sorted(source.glob(FONT_GLOB)) or sorted(source.glob(f"{DEMO_MODULE}/{FONT_GLOB}"))
        if fonts:
            source = fonts[0]
        else:
            emoji = _image_folder_emoji(source)
            if not emoji:
                raise ShardError(f"{source} holds neither {FONT_GLOB} nor emoji images named by code point (1f600.png)")
            return emoji, None
    if not source.is_file():
        raise ShardError(f"emoji source {source} does not exist; pass a font file or a folder of emoji images")
    try:
        font = ImageFont.truetype(str(source), 48)
    except OSError as error:
        raise ShardError(
            f"{source} is not a font PIL can read ({error}); pass a .ttf/.otf or an image folder"
        ) from None
    emoji = [Emoji(name, text=chr(cp)) for cp, name in _font_codepoints(font)]
    if not emoji:
        raise ShardError(f"font {source} has no emoji glyphs; pass the Noto Emoji font")
    return emoji, source


def _font_codepoints(font: ImageFont.FreeTypeFont) -> list[tuple[int, str]]:
    """Named emoji code points the font draws (a glyph that differs from the missing-glyph box)."""

    def mask(text: str) -> bytes:
        image = Image.new("L", (64, 64))
        ImageDraw.Draw(image).text((8, 8), text, font=font, fill=255)
        return image.tobytes()

    missing = mask(chr(0x10FFFD))
    found = []
    for start, stop in EMOJI_RANGES:
        for cp in range(start, stop):
            name = unicodedata.name(chr(cp), "")
            if name and cp not in EXCLUDED and mask(chr(cp)) not in (missing, bytes(64 * 64)):
                found.append((cp, name.lower()))
    return found


def _image_folder_emoji(folder: Path) -> list[Emoji]:
    """Images named by hex code points; caption = the Unicode names of the parts, joined."""
    emoji = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".webp", ".jpg")):
        parts = path.stem.lower().removeprefix("emoji_u").replace("_", "-").split("-")
        try:
            cps = [int(p, 16) for p in parts if p]
        except ValueError:
            continue
        names = [unicodedata.name(chr(cp), "") for cp in cps if cp <= sys.maxunicode and cp not in JOINERS]
        if names and all(names):
            emoji.append(Emoji(", ".join(n.lower() for n in names), image_path=path))
    return emoji


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    luma = [(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255 for c in (a, b)]
    return abs(luma[0] - luma[1])


def _canvas_size(rng: random.Random) -> tuple[int, int]:
    """(h, w) with the short side >= MIN_SIDE and the long side log-uniform up to MAX_SIDE."""
    h, w = rng.choice(ASPECT_RATIOS)
    stretch = max(h, w) / min(h, w)
    long = round(math.exp(rng.uniform(math.log(MIN_SIDE * stretch), math.log(MAX_SIDE))))
    short = max(MIN_SIDE, round(long / stretch))
    return (long, short) if h >= w else (short, long)


def _place(top: int, left: int, box_h: int, box_w: int, height: int, width: int) -> str:
    """Where the emoji's centre lies on a 3x3 grid, in words."""
    row = ("top", "", "bottom")[min(2, int(3 * (top + box_h / 2) / height))]
    col = ("left", "", "right")[min(2, int(3 * (left + box_w / 2) / width))]
    return f"at the {row} {col}".replace("  ", " ").strip() if row or col else "in the centre"


def _glyph_mask(emoji: Emoji, font_path: Path | None, size: int, fonts: dict) -> Image.Image:
    """The emoji as an alpha mask (font) or RGBA image (image folder) about `size` px across."""
    if emoji.image_path is not None:
        with Image.open(emoji.image_path) as image:
            image = image.convert("RGBA")
        image = image.crop(image.getbbox() or (0, 0, *image.size))
        scale = size / max(image.size)
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    if size not in fonts:
        fonts[size] = ImageFont.truetype(str(font_path), size)  # by path: FreeType shares no copies
    left, top, right, bottom = fonts[size].getbbox(emoji.text)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)))
    ImageDraw.Draw(mask).text((-left, -top), emoji.text, font=fonts[size], fill=255)
    return mask


def render_sample(rng: random.Random, emoji: Emoji, font_path: Path | None, fonts: dict) -> tuple[bytes, str, dict]:
    """One image (encoded bytes, extension) and its json fields, all drawn from `rng`."""
    height, width = _canvas_size(rng)
    named = [word for word in emoji.name.split() if word in COLOURS]  # "blue heart" is drawn in blue
    foreground = named[0] if named and emoji.image_path is None else rng.choice(sorted(COLOURS))
    background = rng.choice([c for c in sorted(COLOURS) if _contrast(COLOURS[c], COLOURS[foreground]) > 0.25])
    size = max(12, round(rng.uniform(0.3, 0.9) * min(height, width)))
    glyph = _glyph_mask(emoji, font_path, size, fonts)
    if glyph.width > width or glyph.height > height:  # a few glyphs are wider than their em box
        size = max(8, math.floor(size * min(width / glyph.width, height / glyph.height)))
        glyph = _glyph_mask(emoji, font_path, size, fonts)
    top, left = rng.randint(0, max(0, height - glyph.height)), rng.randint(0, max(0, width - glyph.width))
    canvas = Image.new("RGB", (width, height), COLOURS[background])
    if glyph.mode == "L":
        canvas.paste(COLOURS[foreground], (left, top, left + glyph.width, top + glyph.height), glyph)
        drawn = f"in {foreground} "
    else:
        canvas.paste(glyph, (left, top), glyph)
        drawn, foreground = "", None
    place = _place(top, left, glyph.height, glyph.width, height, width)
    article = "an" if background[0] in "aeiou" else "a"
    caption = f"{emoji.name} emoji {drawn}on {article} {background} background, {place}"
    ext = rng.choice(("png", "jpg"))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG") if ext == "png" else canvas.save(buffer, "JPEG", quality=90)
    fields = {
        "caption": caption,
        "emoji_name": emoji.name,
        "foreground": foreground,
        "background": background,
        "emoji_box_top_left_height_width": [top, left, glyph.height, glyph.width],
    }
    return buffer.getvalue(), ext, fields


VAL_FOLDER = "val"  # held-out shards: <out>/val/*.tar, outside the training glob <out>/*.tar


def _vocabulary(emoji: list[Emoji], seed: int, num_emoji: int | None) -> tuple[list[Emoji], random.Random]:
    """The emoji drawn for this seed (the first `num_emoji`) and the generator, ready to render the training set."""
    rng = random.Random(seed)
    order = list(emoji)
    rng.shuffle(order)
    return order[: num_emoji or None], rng


def _write_samples(
    out: Path,
    order: list[Emoji],
    rng: random.Random,
    count: int,
    samples_per_shard: int,
    font_path: Path | None,
    source_path: Path,
) -> BuildSummary:
    """Render `count` samples cycling through `order` into fresh shards in `out` (its summary written last)."""
    out = prepare_output_dir(out, overwrite=True)
    fonts: dict[int, ImageFont.FreeTypeFont] = {}
    with ShardWriter(out, samples_per_shard) as writer:
        for index in range(count):
            chosen = order[index % len(order)]
            data, ext, fields = render_sample(rng, chosen, font_path, fonts)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            fields["source_path"] = f"{(font_path or source_path).name}#{chosen.source}"
            writer.write(data, ext, fields.pop("caption"), width, height, fields)
    write_json_atomic(out / "_build_summary.json", writer.summary.to_dict())
    return writer.summary


def _checked_source(
    num_samples: int, source: str | Path | None, num_emoji: int | None
) -> tuple[list[Emoji], Path | None, Path]:
    """The source's emoji, its font file (None for an image folder) and its path, after checking the counts."""
    if num_samples < 1:
        raise ShardError(f"num_samples must be >= 1 (got {num_samples})")
    source_path = Path(source) if source is not None else default_source()
    if num_emoji is not None and num_emoji < 1:
        raise ShardError(f"num_emoji must be >= 1 (got {num_emoji})")
    emoji, font_path = load_emoji(source_path)
    return emoji, font_path, source_path


def build_demo_dataset(
    out: str | Path = "outputs/demo_data",
    num_samples: int = 512,
    seed: int = 0,
    source: str | Path | None = None,
    samples_per_shard: int = 128,
    num_emoji: int | None = None,
    val_samples: int = 0,
) -> BuildSummary:
    """Render `num_samples` captioned emoji images into shards in `out` (replacing earlier demo shards).

    `num_emoji` limits the vocabulary to that many emoji (drawn by the seed), which makes a tiny
    model's job learnable; by default every emoji of the source is used, each once before any repeats.
    `val_samples` > 0 also writes that many held-out samples to `out`/val (build_demo_val_shards).
    """
    emoji, font_path, source_path = _checked_source(num_samples, source, num_emoji)
    order, rng = _vocabulary(emoji, seed, num_emoji)
    summary = _write_samples(Path(out), order, rng, num_samples, samples_per_shard, font_path, source_path)
    if val_samples > 0:
        build_demo_val_shards(out, val_samples, seed, source, samples_per_shard, num_emoji)
    return summary


def build_demo_val_shards(
    out: str | Path = "outputs/demo_data",
    val_samples: int = 32,
    seed: int = 0,
    source: str | Path | None = None,
    samples_per_shard: int = 128,
    num_emoji: int | None = None,
) -> BuildSummary:
    """Held-out samples for validation in `out`/val: the training set's vocabulary (same seed and `num_emoji`)
    drawn by a generator of their own, so they are other images than the training ones, whatever the size of
    the training set, and can be added to a training set built before without touching it."""
    emoji, font_path, source_path = _checked_source(val_samples, source, num_emoji)
    order, _ = _vocabulary(emoji, seed, num_emoji)
    rng = random.Random(f"held-out {seed}")
    return _write_samples(Path(out) / VAL_FOLDER, order, rng, val_samples, samples_per_shard, font_path, source_path)

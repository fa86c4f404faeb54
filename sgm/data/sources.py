"""Read image-caption sources for shard building: folders with sidecar captions, CSV/JSONL manifests.

Also probes image bytes (real format, size, EXIF orientation) without re-encoding them. Inputs
that cannot become a sample raise `SkipSample(reason)`; the shard writer counts them.

Size convention (img2dataset's, so our shards and its shards read alike): `original_width` /
`original_height` are the STORED pixels' size, before EXIF orientation; a JPEG/WebP whose EXIF
orientation is not 1 also gets `exif_orientation` in its json, for people and tools reading it.
The loader does not need that field: it swaps the size itself whenever decoding turned the image
by 90 degrees (orientation 5-8; see samples.json_original_size), so one rule covers shards written
before and after that fix and img2dataset's (re-encoded ones carry no EXIF and are already upright).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# Only img2dataset's formats are stored; MPO is the JPEG variant many phone cameras write.
PIL_FORMAT_TO_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# Json fields the shard writer owns; sidecar or manifest columns never override them.
RESERVED_FIELDS = frozenset(
    {
        "key",
        "status",
        "caption",
        "source_path",
        "original_width",
        "original_height",
        "width",
        "height",
        "exif_orientation",
    }
)


class ShardError(Exception):
    """A problem the user can fix (bad path, bad manifest columns, non-empty output folder)."""


class SkipSample(Exception):
    """One input that cannot become a sample; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class SourceItem:
    """One candidate sample: where its image is, its caption, and what to record about it."""

    source_path: str  # recorded in the json as given (relative to the folder / as in the manifest)
    path: Path | None = None
    caption: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None  # already known to be bad while scanning


def probe_image(data: bytes, full_decode: bool = False) -> tuple[str, int, int, int]:
    """(extension, width, height, EXIF orientation) of encoded image bytes, or SkipSample."""
    if not data:
        raise SkipSample("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
                image.verify()
            orientation = _orientation(data) if fmt in ("JPEG", "MPO", "WEBP") else 1  # EXIF in header
            if full_decode:  # verify() misses truncated JPEG data; a full decode does not
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
    except Image.DecompressionBombError as error:
        raise SkipSample("decompression_bomb", str(error)) from None
    except Exception as error:  # PIL raises many types for broken files
        raise SkipSample("corrupt_image", f"{type(error).__name__}: {error}") from None
    if fmt not in PIL_FORMAT_TO_EXT:
        raise SkipSample("unsupported_format", str(fmt))
    return PIL_FORMAT_TO_EXT[fmt], width, height, orientation


def _orientation(data: bytes) -> int:
    """EXIF orientation 1..8; broken EXIF in a good image counts as upright, not as a bad file."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def load_item(item: SourceItem, full_decode: bool = False) -> tuple[bytes, str, int, int, dict[str, Any]]:
    """(image bytes, extension, width, height, json fields) for a good item, or SkipSample."""
    if item.skip_reason:
        raise SkipSample(item.skip_reason)
    if item.path is None or not item.path.is_file():
        raise SkipSample("missing_file")
    if item.caption is None:
        raise SkipSample("missing_caption")
    caption = item.caption.strip()
    if not caption:
        raise SkipSample("empty_caption")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        raise SkipSample("bad_caption_encoding") from None
    try:
        data = item.path.read_bytes()
    except OSError as error:
        raise SkipSample("unreadable", str(error)) from None
    ext, width, height, orientation = probe_image(data, full_decode)
    fields = {**item.extra, "source_path": item.source_path, "caption": caption}
    if orientation != 1:  # sizes stay as stored (like img2dataset); the loader turns them upright
        fields["exif_orientation"] = orientation
    return data, ext, width, height, fields


def iter_folder(root: str | Path) -> Iterator[SourceItem]:
    """Images under `root` (recursive, sorted) with captions from sidecar `.txt` files of the same stem.

    An optional sidecar `.json` object (e.g. an extracted img2dataset sample) adds its fields to
    the sample's json, except RESERVED_FIELDS. Hidden files and folders (names starting with ".")
    are ignored; every other file is an image, a sidecar, or counted as skipped. A missing folder raises here, before any output.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist; pass a folder of images with sidecar .txt captions")
    return _scan_folder(root)


def _scan_folder(root: Path) -> Iterator[SourceItem]:
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    image_stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    for path in files:
        rel, suffix = path.relative_to(root).as_posix(), path.suffix.lower()
        if suffix in (".txt", ".json"):
            if path.with_suffix("") not in image_stems:
                yield SourceItem(rel, path, skip_reason="orphan_sidecar")
        elif suffix not in IMAGE_EXTENSIONS:
            yield SourceItem(rel, path, skip_reason="unknown_extension")
        else:
            yield _with_sidecar_caption(rel, path)


def _with_sidecar_caption(rel: str, path: Path) -> SourceItem:
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return SourceItem(rel, path, skip_reason="missing_caption")
    try:
        caption = sidecar.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return SourceItem(rel, path, skip_reason="bad_caption_encoding")
    except OSError:
        return SourceItem(rel, path, skip_reason="unreadable")
    extra: Any = {}
    if path.with_suffix(".json").is_file():
        try:
            extra = json.loads(path.with_suffix(".json").read_bytes())
        except (OSError, ValueError):
            extra = None
        if not isinstance(extra, dict):
            return SourceItem(rel, path, skip_reason="bad_sidecar_json")
    return SourceItem(rel, path, caption, {k: v for k, v in extra.items() if k not in RESERVED_FIELDS})


def iter_manifest(
    manifest: str | Path, path_column: str = "path", caption_column: str = "caption"
) -> Iterator[SourceItem]:
    """Rows of a `.csv` or `.jsonl` manifest; relative paths are relative to the manifest's folder.

    Other columns/fields are copied into each sample's json (CSV values that parse as JSON numbers
    or booleans become numbers/booleans), except the names the writer owns (RESERVED_FIELDS).
    A missing file, unknown suffix or missing CSV column raises here, before any output.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ShardError(f"manifest {manifest} does not exist; pass a .csv or .jsonl file with path and caption")
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        _check_utf8(manifest)
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            columns = next(csv.reader(handle), [])
        for needed, option in ((path_column, "--path-column"), (caption_column, "--caption-column")):
            if needed not in columns:
                raise ShardError(
                    f"manifest {manifest} has no column {needed!r} (columns: {columns}); "
                    f"rename the column or pass {option}"
                )
        rows = _csv_rows(manifest, (path_column, caption_column))
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(manifest)
    else:
        raise ShardError(f"manifest {manifest} must end in .csv or .jsonl (got {suffix or 'no extension'})")
    return _manifest_items(manifest, rows, path_column, caption_column)


def _manifest_items(manifest: Path, rows, path_column: str, caption_column: str) -> Iterator[SourceItem]:
    for where, row in rows:
        if row is None or not isinstance(row.get(path_column), str) or not row[path_column].strip():
            yield SourceItem(where, skip_reason="bad_manifest_row")
            continue
        given = row[path_column].strip()
        path = Path(given) if Path(given).is_absolute() else manifest.parent / given
        caption = row.get(caption_column)
        extra = {k: v for k, v in row.items() if k not in (path_column, caption_column) and k not in RESERVED_FIELDS}
        yield SourceItem(given, path, caption if isinstance(caption, str) else None, extra)


def _check_utf8(path: Path) -> None:
    """Fail before any output when a CSV manifest is not UTF-8 (it would stop the build midway)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        try:
            while chunk := handle.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ShardError(f"manifest {path} is not UTF-8 text; re-save it as UTF-8") from None


def _csv_rows(manifest: Path, text_columns: tuple[str, str]) -> Iterator[tuple[str, dict | None]]:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            clean = {k: v if k in text_columns else _csv_value(v) for k, v in row.items() if k and v is not None}
            yield f"{manifest.name}:{reader.line_num}", clean


def _csv_value(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def _jsonl_rows(manifest: Path) -> Iterator[tuple[str, dict | None]]:
    with open(manifest, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:  # json.loads takes bytes in UTF-8 (with or without BOM); a bad line is one bad row
                row = json.loads(line.removeprefix(b"\xef\xbb\xbf"))
            except ValueError:
                row = None
            yield f"{manifest.name}:{number}", row if isinstance(row, dict) else None

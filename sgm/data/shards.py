"""Write and inspect webdataset shards in img2dataset's format.

A shard is a tar of samples `<key>.<jpg|png|webp>` (the source file's bytes, never re-encoded),
`<key>.json` ({"key", "original_width", "original_height", "caption", "source_path", ...}) and
`<key>.txt` (the caption). Sizes are the stored pixels' (before EXIF orientation), as img2dataset
records them; the loader turns them upright (sources.py, samples.json_original_size). Each shard
is written to `NNNNN.tar.tmp` and renamed when complete, so a crash never leaves a partial shard
under a final name. Keys follow img2dataset:
`f"{shard:05d}{index:0{N}d}"` with N = max(4, digits of samples_per_shard - 1), so keys are unique
across shards and sort in write order. Bad inputs never stop a build: they are skipped and
counted by reason (`SKIP_REASONS`), with a few example paths per reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgm.data.sources import (  # noqa: F401  (re-exported: the shard API in one place)
    IMAGE_EXTENSIONS,
    PIL_FORMAT_TO_EXT,
    RESERVED_FIELDS,
    ShardError,
    SkipSample,
    SourceItem,
    iter_folder,
    iter_manifest,
    load_item,
    probe_image,
)

OWN_FILE_PATTERN = re.compile(r"^(\d{5}\.tar(\.tmp)?|\d{5}_stats\.json|_build_summary\.json)$")
SHARD_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
SKIP_REASONS = {
    "empty_file": "the image file has zero bytes",
    "unreadable": "the file could not be read (permissions or I/O error)",
    "corrupt_image": "PIL could not open or verify the image",
    "decompression_bomb": "the image is larger than PIL's decompression-bomb limit",
    "unsupported_format": "a real image but not JPEG/PNG/WebP: convert it to one of those first",
    "unknown_extension": "not an image file extension",
    "missing_caption": "no sidecar .txt with the same stem / no caption in the manifest row",
    "empty_caption": "the caption is empty",
    "bad_caption_encoding": "the sidecar caption is not UTF-8 text",
    "orphan_sidecar": "a .txt or .json with no image of the same stem beside it",
    "bad_sidecar_json": "the image's sidecar .json is not a JSON object",
    "missing_file": "the manifest names a path that does not exist",
    "bad_manifest_row": "a manifest row that is not valid JSON or has no path",
}
EXAMPLES_PER_REASON = 5


@dataclass
class BuildSummary:
    """What a build wrote and what it skipped, by reason."""

    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": self.examples,
            "shards": [p.name for p in self.shards],
        }

    def format(self) -> str:
        lines = [f"wrote {self.written} samples in {len(self.shards)} shards, skipped {sum(self.skipped.values())}"]
        for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            shown = ", ".join(self.examples.get(reason, []))
            lines.append(f"  {reason}: {count} ({SKIP_REASONS.get(reason, reason)}), e.g. {shown}")
        return "\n".join(lines)


class ShardWriter:
    """Append samples to numbered shards; a shard gets its final name only once complete.

    Use as a context manager: on an exception the shard being written is discarded (complete
    shards stay), otherwise the last shard is finished. A shard rolls over at
    `samples_per_shard` samples, or before a sample that would make the file larger than
    `max_shard_bytes` (a single sample larger than that still gets a shard of its own).
    Member mtimes are fixed, so the same samples give byte-identical shards.
    """

    def __init__(
        self, out_dir: str | Path, samples_per_shard: int = 10000, max_shard_bytes: int | None = None, mtime: int = 0
    ) -> None:
        if samples_per_shard < 1:
            raise ShardError(f"samples_per_shard must be >= 1 (got {samples_per_shard})")
        if max_shard_bytes is not None and max_shard_bytes < 1:
            raise ShardError(f"max_shard_bytes must be positive (got {max_shard_bytes})")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard, self.max_shard_bytes, self.mtime = samples_per_shard, max_shard_bytes, mtime
        self.summary = BuildSummary()
        self._digits = max(4, len(str(samples_per_shard - 1)))
        self._shard, self._count, self._shard_skips = -1, 0, Counter()
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort_shard()

    def write(
        self, image: bytes, ext: str, caption: str, width: int, height: int, extra: Mapping[str, Any] | None = None
    ) -> str:
        """Add one sample; returns its key. `extra` fields go into the json (required fields win)."""
        if not ext.isalnum():
            raise ShardError(f"image extension must be letters/digits without a dot, e.g. 'jpg' (got {ext!r})")
        members = self._members(self._shard, self._count, image, ext, caption, width, height, extra)
        if self._tar is None or self._count >= self.samples_per_shard or self._too_big(members):
            self._finish_shard()
            self._open_shard()
            members = self._members(self._shard, 0, image, ext, caption, width, height, extra)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.summary.written += 1
        return members[0][0].partition(".")[0]

    def skip(self, reason: str, source: str = "") -> None:
        """Count one input that did not become a sample (in the summary and the current shard's stats)."""
        self._shard_skips[reason] += 1
        self.summary.skipped[reason] += 1
        shown = self.summary.examples.setdefault(reason, [])
        if source and len(shown) < EXAMPLES_PER_REASON:
            shown.append(source)

    def close(self) -> BuildSummary:
        self._finish_shard()
        return self.summary

    def _members(self, shard, index, image, ext, caption, width, height, extra) -> list[tuple[str, bytes]]:
        key = f"{shard:05d}{index:0{self._digits}d}"
        meta = dict(extra or {})
        meta.update(key=key, status="success", caption=caption, original_width=width, original_height=height)
        meta.update(width=width, height=height)
        text = json.dumps(meta, indent=1, sort_keys=True).encode()
        return [(f"{key}.{ext}", image), (f"{key}.json", text), (f"{key}.txt", caption.encode())]

    def _too_big(self, members: list[tuple[str, bytes]]) -> bool:
        if self.max_shard_bytes is None or self._count == 0:
            return False
        size = self._file.tell() + sum(tarfile.BLOCKSIZE + _round_up(len(d), tarfile.BLOCKSIZE) for _, d in members)
        return _round_up(size + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE) > self.max_shard_bytes

    def _paths(self) -> tuple[Path, Path]:
        final = self.out_dir / f"{self._shard:05d}.tar"
        return final, final.with_name(final.name + ".tmp")

    def _open_shard(self) -> None:
        self._shard += 1
        self._count = 0
        self._file = open(self._paths()[1], "wb")  # noqa: SIM115 - open across calls, closed in _finish_shard
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        final, tmp = self._paths()
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(tmp, final)
        failed = sum(self._shard_skips.values())
        stats = {
            "count": self._count + failed,
            "successes": self._count,
            "failed": failed,
            "status_dict": {"success": self._count, **dict(sorted(self._shard_skips.items()))},
        }
        write_json_atomic(self.out_dir / f"{self._shard:05d}_stats.json", stats)
        self.summary.shards.append(final)
        self._tar, self._file, self._shard_skips = None, None, Counter()

    def _abort_shard(self) -> None:
        if self._tar is None:
            return
        tmp = self._paths()[1]
        self._file.close()
        tmp.unlink(missing_ok=True)
        self._tar, self._file = None, None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prepare_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Make `out_dir`; refuse one that already holds shards unless `overwrite` (then remove only ours)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"output {out_dir} is a file; pass a folder for the shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob("*.tar.tmp"):  # a crashed build's partial shard
        if OWN_FILE_PATTERN.match(leftover.name):
            leftover.unlink()
    existing = sorted(p.name for p in out_dir.glob("*.tar"))
    if existing and not overwrite:
        raise ShardError(
            f"output folder {out_dir} already holds {len(existing)} shard(s) ({existing[0]}, ...); "
            "pass --overwrite to replace them or choose another --out"
        )
    for path in out_dir.iterdir():
        if overwrite and OWN_FILE_PATTERN.match(path.name):
            path.unlink()
    foreign = sorted(p.name for p in out_dir.glob("*.tar"))
    if foreign:
        raise ShardError(f"output folder {out_dir} holds other tar files ({foreign[0]}, ...); choose an empty --out")
    return out_dir


def build_shards(
    items: Iterable[SourceItem],
    out_dir: str | Path,
    samples_per_shard: int = 10000,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    full_decode: bool = False,
    progress: bool = False,
) -> BuildSummary:
    """Turn source items into shards in `out_dir`; returns the summary (also saved as _build_summary.json)."""
    out_dir = prepare_output_dir(out_dir, overwrite)
    from tqdm import tqdm  # a dependency of lightning; only needed here

    with ShardWriter(out_dir, samples_per_shard, max_shard_bytes) as writer:
        bar = tqdm(items, disable=not progress, unit="img", file=sys.stderr, dynamic_ncols=True)
        for item in bar:
            try:
                data, ext, width, height, fields = load_item(item, full_decode)
            except SkipSample as skip:
                writer.skip(skip.reason, item.source_path)
                bar.set_postfix(skipped=sum(writer.summary.skipped.values()), refresh=False)
                continue
            writer.write(data, ext, fields.pop("caption"), width, height, fields)
    write_json_atomic(out_dir / "_build_summary.json", writer.summary.to_dict())
    return writer.summary


@dataclass
class ShardReport:
    """What existing shards hold, grouped into samples the way webdataset groups them."""

    shards: int = 0
    samples: int = 0
    bytes: int = 0
    extensions: Counter = field(default_factory=Counter)  # samples per member extension
    without_image: int = 0
    without_caption: int = 0
    samples_per_shard: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{self.shards} shards, {self.samples} samples, {self.bytes / 1e6:.1f} MB"]
        lines.append("  samples per extension: " + ", ".join(f"{k}={v}" for k, v in sorted(self.extensions.items())))
        lines.append(f"  samples without an image: {self.without_image}, without a txt caption: {self.without_caption}")
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


def describe_shards(paths: Iterable[str | Path]) -> ShardReport:
    """Count samples per extension in existing shards (ours or img2dataset's, e.g. LAION/CC12M).

    A folder stands for the `*.tar` files in it. A shard that cannot be read is reported in
    `errors`, not raised.
    """
    report = ShardReport()
    for given in paths:
        given = Path(given)
        for shard in sorted(given.glob("*.tar")) if given.is_dir() else [given]:
            report.shards += 1
            try:
                count = _describe_one(shard, report)
            except (OSError, tarfile.TarError) as error:
                report.errors.append(f"{shard}: {type(error).__name__}: {error}")
                continue
            report.samples_per_shard[str(shard)] = count
    return report


def _describe_one(shard: Path, report: ShardReport) -> int:
    report.bytes += shard.stat().st_size
    groups: list[set[str]] = []
    last_key = None
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")  # webdataset splits at the first dot of the basename
            key = f"{folder}/{stem}"
            if key != last_key:
                groups.append(set())
                last_key = key
            groups[-1].add(ext.lower() if dot else "")
    for exts in groups:
        report.extensions.update(exts)
        report.without_image += not (exts & SHARD_IMAGE_EXTENSIONS)
        report.without_caption += "txt" not in exts
    report.samples += len(groups)
    return len(groups)

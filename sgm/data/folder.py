"""Train from a folder of images with .txt captions: `data=folder data.folder=DIR`.

`folder_loader` (configs/data/folder.yaml) turns the folder into webdataset shards once, with the
project's shard writer (shards.ShardWriter: image bytes stored as they are, never re-encoded; the
json records original_width/original_height and the EXIF orientation, which the loader turns
upright), and returns a BucketedLoader over them. What it does, and the choices made:

- Scan: DIR recursively (folder symlinks followed once), images with the extensions jpg, jpeg,
  png, webp in any case. Hidden files and folders (".name") are skipped, and so is any folder
  holding a build of ours (FOLDER_MARKER) and the cache folder itself, should it lie inside DIR.
- Caption: the same-stem `.txt` beside the image (UTF-8, a BOM dropped, stripped). An image
  without one, or with an empty one, gets `default_caption`, "" by default: the usual choice for
  unconditional / trigger-word training (with a trigger its caption is just the trigger). The
  file stem is not used: camera names (IMG_1234) would be trained as text. A `.txt` that is not
  UTF-8 skips its image (counted as bad_caption_encoding, named in the log).
- Trigger: `trigger` (e.g. "sks") is prepended as "<trigger>, <caption>" ("<trigger>" alone for
  an empty caption); a caption whose first comma-separated tag already is the trigger is kept.
- Corrupt images are skipped and counted AT BUILD TIME (shards.probe_image: PIL cannot open or
  verify them, zero bytes, a format other than JPEG/PNG/WebP): the log names the count by reason
  with examples and `_folder_cache.json` keeps them. What verify() cannot see (a JPEG truncated
  in its data) is left to the loader's bad-input counting (data.max_bad_fraction).
- Cache: `<folder_cache>/<folder name>-<hash16>` (folder_cache defaults to outputs/folder_shards,
  relative to the working directory, as the run folders are), hash16 = a fingerprint of the
  folder: each image's relative path, size and mtime, each caption's path, mtime and content,
  the trigger, the default caption and the shard layout. An unchanged folder reuses its shards
  (nothing is rewritten); any change builds a new cache beside the old one (old ones are listed
  in the log, never deleted: a run may still read them).
- Build: into a hidden temporary folder beside the cache, renamed into place once complete, so a
  cache folder is either complete or absent. Several processes (ranks, runs) starting at once
  serialise on a lock file (fcntl.flock); where a lock does not hold (some network file systems)
  the rename decides: the first complete build wins, later ones are discarded. Progress (images
  done, rate) is logged every PROGRESS_SECONDS.
- Repeats: `repeats` R >= 1 gives the loader the shard list R times, so a pass (an epoch of the
  stream) reads every sample R times. Each copy is its own position (shard index, offset), with
  its own crop and flip draws, and is dealt to the data slots like any shard (balanced by samples,
  exact resume and re-split unchanged); two copies of one image may share a batch, as in kohya's
  repeats. Bad samples are counted per copy (the fraction is unchanged).
- No upscaling: `bucket_no_upscale` (default true here) trains an image smaller than its bucket
  at a smaller bucket of the same aspect (samples.ImageProcessor, buckets.no_upscale_bucket).
- Cached latents: `cache_latents` (off by default) encodes the build once more with the run's VAE,
  into `<build>-latents-<hash16>` beside it, and returns a LatentLoader over that (the cached shard
  list `repeats` times): each image then keeps one crop and is never flipped (folder_latents.py).

Errors a user can fix (no folder, not readable, no images, nothing usable, repeats < 1) are one
ValueError naming the data.* key and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sgm.data.loader import BucketedLoader
from sgm.data.shards import ShardWriter, SkipSample, probe_image, write_json_atomic

if TYPE_CHECKING:
    from sgm.data.latent_loader import LatentLoader

FOLDER_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
DEFAULT_CACHE = "outputs/folder_shards"
FOLDER_MARKER = "_folder_cache.json"  # written last into a complete build
FOLDER_FORMAT = 1  # part of the fingerprint: bump when what a build writes changes
SAMPLES_PER_SHARD = 256  # many shards even for a few thousand images: whole shards balance over the data slots
MAX_SHARD_BYTES = 1 << 30
PROGRESS_SECONDS = 10.0
STALE_TMP_SECONDS = 3600.0  # a temporary build folder this old is a crashed build's
EXAMPLES = 5
_log = logging.getLogger(__name__)
Built = TypeVar("Built")


@dataclass(frozen=True)
class FolderImage:
    """One image of the folder and its caption as trained (trigger applied), or why it is skipped."""

    rel: str  # posix path relative to the folder
    path: Path
    caption: str
    stat: tuple[Any, ...]  # what the fingerprint records of the image and its caption file
    skip_reason: str | None = None


@dataclass
class FolderShards:
    """A complete build: where, its shards, and what it holds."""

    path: Path
    shards: list[str]
    images: int
    written: int
    skipped: dict[str, int] = field(default_factory=dict)
    built: bool = False  # False: an earlier build was reused


def folder_loader(
    folder: str | None = None,
    *,
    repeats: int = 1,
    trigger: str | None = None,
    default_caption: str = "",
    folder_cache: str | None = None,
    bucket_no_upscale: bool = True,
    base_resolution: int | None = 1024,
    square_size: int | None = None,
    shards: str | Sequence[str] | None = None,
    cache_latents: bool = False,
    cache_text_embeddings: bool = False,
    run: Mapping[str, Any] | None = None,
    **loader_options: Any,
) -> BucketedLoader | LatentLoader:
    """Build (or reuse) the folder's shards, then return a BucketedLoader over them, `repeats` times.

    `shards` instead of `folder`: already-built shards (e.g. another machine's cache folder) read with
    these settings; trigger and default_caption apply only to a folder build. `loader_options` are
    BucketedLoader's (batch_size, seed, num_workers, rank, world_size, flip_probability, ...).
    `cache_latents`: the build is encoded once by the run's VAE (`run`: the run's model, pretrained,
    pretrained_parts and module.trainable, by reference) and a LatentLoader reads it (folder_latents.py)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(
            f"data.repeats must be an integer >= 1 (reads per pass), got {repeats!r}; e.g. data.repeats=10"
        )
    if folder is not None and shards is not None:
        raise ValueError("give data.folder (images to build from) or already-built data.shards, not both")
    latents = None
    if cache_latents or cache_text_embeddings:
        from sgm.data.folder_latents import LatentRequest  # torch and the model code: only when asked

        latents = LatentRequest.checked(
            run or {},
            text_embeddings=cache_text_embeddings,
            cache_latents=cache_latents,
            from_folder=shards is None,
            base_resolution=base_resolution,
            square_size=square_size,
            bucket_no_upscale=bucket_no_upscale,
            options=loader_options,
        )
    if shards is None:
        built = build_folder_shards(
            folder,
            cache=folder_cache,
            trigger=trigger,
            default_caption=default_caption,
            verbose=_is_rank0(loader_options),
        )
        shard_list: list[str] = built.shards
        if latents is not None:
            return latents.loader(built, repeats, loader_options, verbose=_is_rank0(loader_options))
    else:
        shard_list = [shards] if isinstance(shards, str) else list(shards)
    return BucketedLoader(
        shard_list * repeats,
        base_resolution=base_resolution,
        square_size=square_size,
        bucket_no_upscale=bucket_no_upscale,
        **loader_options,
    )


def _is_rank0(options: dict[str, Any]) -> bool:
    return options.get("rank") in (None, 0)


# -- scanning ----------------------------------------------------------------------------------------
def with_trigger(caption: str, trigger: str | None) -> str:
    """The caption as trained: "<trigger>, <caption>", "<trigger>" for an empty caption, the caption as it
    is when its first comma-separated tag already is the trigger (or there is no trigger)."""
    trigger = str(trigger or "").strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if caption.split(",", 1)[0].strip() == trigger:
        return caption
    return f"{trigger}, {caption}"


def scan_folder(
    folder: str | Path, trigger: str | None = None, default_caption: str = "", skip: Path | None = None
) -> list[FolderImage]:
    """The folder's images (sorted by relative path) with their captions; raises ValueError naming data.folder."""
    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise ValueError(
            f"data.folder={folder} {what}. Fix: set data.folder to a folder of images (jpg, jpeg, png, webp; "
            "sub-folders included) with optional same-name .txt captions"
        )
    try:
        os.listdir(root)
    except OSError as error:
        raise ValueError(
            f"data.folder={folder} cannot be read ({error.strerror}). Fix: give the training user read access "
            "or set data.folder to a readable copy"
        ) from None
    skip_real = os.path.realpath(skip) if skip is not None else None
    images = [
        _with_caption(root, path, trigger, default_caption)
        for path in sorted(_image_paths(root, skip_real), key=lambda p: p.relative_to(root).as_posix())
    ]
    if not images:
        raise ValueError(
            f"data.folder={folder} holds no images (looked for .jpg, .jpeg, .png, .webp in it and its sub-folders; "
            "hidden ones are skipped). Fix: set data.folder to the folder that holds the training images"
        )
    return images


def _image_paths(root: Path, skip_real: str | None) -> Iterator[Path]:
    visited: set[str] = set()
    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in visited or real == skip_real or (current != str(root) and FOLDER_MARKER in files):
            dirs[:] = []  # a symlink loop, our cache, or a build of ours
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in FOLDER_IMAGE_EXTENSIONS:
                yield Path(current) / name


def _with_caption(root: Path, path: Path, trigger: str | None, default_caption: str) -> FolderImage:
    rel = path.relative_to(root).as_posix()
    try:
        image_stat = path.stat()
    except OSError:
        return FolderImage(rel, path, "", (rel, None), "unreadable")
    sidecar, caption, reason, caption_stat = path.with_suffix(".txt"), "", None, None
    try:
        data = sidecar.read_bytes()
        caption_stat = (sidecar.stat().st_mtime_ns, hashlib.sha256(data).hexdigest())
        caption = data.decode("utf-8-sig").strip()
    except FileNotFoundError:
        pass
    except OSError:
        reason = "unreadable"
    except UnicodeDecodeError:
        reason = "bad_caption_encoding"
    caption = with_trigger(caption or default_caption.strip(), trigger)
    stat = (rel, image_stat.st_size, image_stat.st_mtime_ns, caption_stat)
    return FolderImage(rel, path, caption, stat, reason)


def folder_fingerprint(images: Sequence[FolderImage], trigger: str | None, default_caption: str) -> str:
    """hash16 of what a build depends on (see the module docstring)."""
    digest = hashlib.sha256()
    head = {"format": FOLDER_FORMAT, "trigger": trigger or "", "default_caption": default_caption}
    head.update(samples_per_shard=SAMPLES_PER_SHARD, max_shard_bytes=MAX_SHARD_BYTES)
    digest.update(json.dumps(head, sort_keys=True).encode() + b"\n")
    for image in images:
        digest.update(json.dumps(image.stat).encode() + b"\n")
    return digest.hexdigest()[:16]


# -- building ----------------------------------------------------------------------------------------
def cache_name(folder: str | Path, fingerprint: str) -> str:
    """<folder name>-<hash16>, the name made safe for any file system."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(folder)).expanduser().resolve().name).strip("._") or "folder"
    return f"{name[:64]}-{fingerprint}"


def build_folder_shards(
    folder: str | Path | None,
    *,
    cache: str | Path | None = None,
    trigger: str | None = None,
    default_caption: str | None = "",
    verbose: bool = True,
) -> FolderShards:
    """The folder's shards in `cache` (default outputs/folder_shards): reused when the folder is unchanged,
    else built atomically under a lock (see the module docstring)."""
    if folder is None or str(folder).strip() in ("", "???"):
        raise ValueError(
            "data.folder is not set. Fix: data.folder=/path/to/images (a folder of images with same-name .txt captions)"
        )
    default_caption = "" if default_caption is None else str(default_caption)  # YAML: null, or a number
    trigger = None if trigger is None or not str(trigger).strip() else str(trigger).strip()
    cache_root = Path(str(cache if cache is not None else DEFAULT_CACHE)).expanduser()
    images = scan_folder(folder, trigger, default_caption, skip=cache_root)
    fingerprint = folder_fingerprint(images, trigger, default_caption)
    final = cache_root / cache_name(folder, fingerprint)
    found, record = build_once(  # see the module docstring: lock, temporary folder, rename
        final,
        lambda: _complete(final, fingerprint),
        lambda tmp: _write(images, tmp, folder, fingerprint, trigger, default_caption),
    )
    if record is None:
        if verbose:
            _log.info("data.folder=%s: unchanged, reusing %d samples in %s", folder, found.written, final)
        return found
    found.built = True
    _report(found, record, folder, cache_root, final)
    return found


def build_once(final: Path, complete: Callable[[], Built | None], write: Callable[[Path], Any]) -> tuple[Built, Any]:
    """(the build at `final`, what `write` returned or None when an existing build was used).

    `complete()` returns the build when `final` holds a complete one. Otherwise `write(tmp)` fills a
    hidden temporary folder beside `final`, under a lock file, and the folder is renamed into place: a
    build is complete or absent, and of builds racing without a working lock the first rename wins."""
    found = complete()
    if found is not None:
        return found, None
    cache_root = final.parent
    cache_root.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_root / f".{final.name}.lock"):
        found = complete()  # another process built it while this one waited
        if found is not None:
            return found, None
        _remove_stale(cache_root, final, complete)
        tmp = cache_root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            result = write(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                found = complete()
                if found is None:
                    raise
                return found, None  # another node's build won the rename
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = complete()
    if found is None:  # pragma: no cover - the rename just put it there
        raise RuntimeError(f"the build {final} vanished after it was renamed into place")
    return found, result


def completed_build(final: Path, marker: str, fingerprint: str) -> tuple[dict[str, Any], list[str]] | None:
    """(marker record, shard paths) of the build at `final` when its marker (written last) names this
    fingerprint and every shard it lists is there, else None."""
    try:
        record = json.loads((final / marker).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    shards = [str(final / name) for name in record.get("shards", [])]
    if not shards or not all(os.path.isfile(p) for p in shards):
        return None
    return record, shards


def _complete(final: Path, fingerprint: str) -> FolderShards | None:
    """The build at `final` when it is complete and of this fingerprint, else None."""
    found = completed_build(final, FOLDER_MARKER, fingerprint)
    if found is None:
        return None
    record, shards = found
    return FolderShards(final, shards, record["images"], record["written"], dict(record.get("skipped", {})))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the file at `path` while the block runs (where the file system can lock; else none)."""
    import fcntl

    with open(path, "a") as handle:
        with contextlib.suppress(OSError):  # no locking on this file system: the rename decides
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(cache_root: Path, final: Path, complete: Callable[[], Any]) -> None:
    """Remove crashed builds of this cache (temporary folders older than STALE_TMP_SECONDS), and an
    incomplete `final` (never left by a build; e.g. files removed by hand)."""
    now = time.time()
    for leftover in cache_root.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
    if final.exists() and complete() is None:
        _log.warning("removing the incomplete build %s", final)
        shutil.rmtree(final, ignore_errors=True)


def _write(
    images: Sequence[FolderImage],
    out: Path,
    folder: str | Path,
    fingerprint: str,
    trigger: str | None,
    default_caption: str,
) -> dict[str, Any]:
    """Write the shards and the marker into `out`; returns the marker's record."""
    out.mkdir(parents=True)
    start = last = time.monotonic()
    _log.info("data.folder=%s: building shards of %d images in %s", folder, len(images), out.parent)
    examples: dict[str, list[str]] = {}
    with ShardWriter(out, samples_per_shard=SAMPLES_PER_SHARD, max_shard_bytes=MAX_SHARD_BYTES) as writer:
        for done, image in enumerate(images, start=1):
            try:
                if image.skip_reason:
                    raise SkipSample(image.skip_reason)
                try:
                    data = image.path.read_bytes()
                except OSError as error:
                    raise SkipSample("unreadable", str(error)) from None
                ext, width, height, orientation = probe_image(data)
            except SkipSample as skip:
                writer.skip(skip.reason, image.rel)
                shown = examples.setdefault(skip.reason, [])
                if len(shown) < EXAMPLES:
                    shown.append(image.rel)
            else:
                extra: dict[str, Any] = {"source_path": image.rel}
                if orientation != 1:
                    extra["exif_orientation"] = orientation
                writer.write(data, ext, image.caption, width, height, extra)
            now = time.monotonic()
            if now - last >= PROGRESS_SECONDS:
                last = now
                rate = done / max(now - start, 1e-9)
                _log.info("data.folder: %d/%d images (%.0f img/s, %d skipped)", done, len(images), rate,
                          sum(writer.summary.skipped.values()))  # fmt: skip
    summary = writer.summary
    if summary.written == 0:
        counts = ", ".join(f"{reason}={count}" for reason, count in sorted(summary.skipped.items()))
        raise ValueError(
            f"data.folder={folder}: none of its {len(images)} images can be used ({counts}; e.g. "
            f"{', '.join(next(iter(examples.values()), []))}). Fix: set data.folder to a folder of JPEG, PNG or "
            "WebP images that open"
        )
    record = {
        "format": FOLDER_FORMAT,
        "fingerprint": fingerprint,
        "folder": str(Path(str(folder)).expanduser().resolve()),
        "images": len(images),
        "written": summary.written,
        "skipped": dict(sorted(summary.skipped.items())),
        "examples": examples,
        "trigger": trigger or "",
        "default_caption": default_caption,
        "shards": [p.name for p in summary.shards],
        "seconds": round(time.monotonic() - start, 3),
    }
    write_json_atomic(out / FOLDER_MARKER, record)  # last: its presence marks a complete build
    return record


def _report(result: FolderShards, record: dict[str, Any], folder: str | Path, cache_root: Path, final: Path) -> None:
    seconds = max(record["seconds"], 1e-9)
    _log.info(
        "data.folder=%s: wrote %d samples in %d shard(s) to %s (%.1f s, %.0f img/s)",
        folder, result.written, len(result.shards), final, seconds, record["images"] / seconds,
    )  # fmt: skip
    if result.skipped:
        examples = record["examples"]
        counts = ", ".join(
            f"{reason}={count} (e.g. {', '.join(examples.get(reason, []))})"
            for reason, count in Counter(result.skipped).most_common()
        )
        _log.warning("data.folder=%s: skipped %d image(s): %s", folder, sum(result.skipped.values()), counts)
    same = re.compile(re.escape(final.name[:-17]) + r"-[0-9a-f]{16}")
    older = sorted(p.name for p in cache_root.iterdir() if p != final and same.fullmatch(p.name) and p.is_dir())
    if older:
        _log.info("older builds of this folder in %s (delete them once no run reads them): %s", cache_root, older)

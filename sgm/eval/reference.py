"""The reference image set of an evaluation and its Inception features, cached by fingerprint.

A reference set is a folder of images (nested; jpg, jpeg, png, webp in any case; hidden files and
folders skipped) or webdataset image shards (a path, glob, brace range or list: the training data's
own `sgm.data.shard_list.expand_shards`). Images are decoded as training decodes them
(`sgm.data.decode`: EXIF orientation applied, alpha composited on white, CMYK/16-bit converted) and,
when `size` is given (the size the model samples at), resized so the shorter side is `size`
(Pillow bicubic, antialiased, as training's `resize_and_crop`) and centre-cropped to size x size.
Order is fixed: folder images by relative path, shards in list order and each shard in member
order, so `max_images` always takes the same images. A corrupt image is skipped and counted.

Features are expensive (an Inception pass is ~0.1-0.3 s per image on a CPU), so `reference_features`
keeps them in `<cache_dir>/<source name>-<hash16>.npz`, hash16 being a fingerprint of what they
depend on: the source's files (absolute paths, sizes, mtimes; remote shard URLs by name only), size,
max_images and the weights file's sha256. A changed file gives a new fingerprint (a new cache file;
old ones are left, they are small). Writes are atomic (temporary file, then rename), so concurrent
processes at worst compute twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sgm.checkpoint.io import atomic_write
from sgm.data.crop import resize_and_crop
from sgm.data.decode import BadSample, decode_image
from sgm.data.samples import IMAGE_EXTENSIONS
from sgm.data.shard_list import expand_shards, iter_shard, local_tar_path
from sgm.eval.inception import FEATURE_DIM, InceptionFeatures

DEFAULT_CACHE_DIR = "outputs/eval_cache"
CACHE_FORMAT = 1  # part of the fingerprint: bump when what the cache holds or how images are prepared changes
PROGRESS_SECONDS = 10.0
_FOLDER_EXTENSIONS = frozenset(f".{ext}" for ext in IMAGE_EXTENSIONS)
_log = logging.getLogger(__name__)

Source = str | Sequence[str]


def reference_images(
    source: Source, size: int | None, *, skipped: dict[str, int] | None = None
) -> Iterator[torch.Tensor]:
    """uint8 images [3, H, W] of `source` in a fixed order; size x size centre crops when `size` is given.

    Corrupt images are skipped; `skipped` (reason -> count), when given, receives them.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 or None, got {size}")
    counts = skipped if skipped is not None else {}
    for name, data in _raw_images(source, counts):
        try:
            image = decode_image(data)
        except BadSample as bad:
            counts[bad.reason] = counts.get(bad.reason, 0) + 1
            _log.debug("reference image %s skipped: %s", name, bad)
            continue
        yield _to_tensor(image, size)


def reference_features(
    source: Source,
    extractor: InceptionFeatures,
    *,
    size: int | None,
    max_images: int | None,
    cache_dir: str | os.PathLike | None,
) -> torch.Tensor:
    """Inception features (float64 [N, 2048], CPU) of the reference set, read from the cache when it holds them.

    Raises ValueError naming the source when it holds no usable image.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    fingerprint = source_fingerprint(source, size, max_images, extractor.weights_sha256)
    cache = (
        Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / f"{_source_name(source)}-{fingerprint}.npz"
    )
    cached = _read_cache(cache)
    if cached is not None:
        _log.info("reference features of %s: %d images, read from %s", _describe(source), cached.shape[0], cache)
        return cached
    skipped: dict[str, int] = {}
    features = _extract(reference_images(source, size, skipped=skipped), extractor, max_images)
    if skipped:
        _log.warning(
            "reference set %s: %d corrupt image(s) skipped %s", _describe(source), sum(skipped.values()), skipped
        )
    if features.shape[0] == 0:
        raise ValueError(
            f"reference set {_describe(source)} holds no usable image (skipped: {skipped or 'none found'}). "
            "Fix: give a folder of jpg/png/webp images or webdataset shards with an image per sample"
        )
    _write_cache(cache, features, skipped)
    _log.info("reference features of %s: %d images, cached in %s", _describe(source), features.shape[0], cache)
    return features


def source_fingerprint(source: Source, size: int | None, max_images: int | None, weights_sha256: str) -> str:
    """hash16 of what reference features depend on (see the module docstring)."""
    digest = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "size": size, "max_images": max_images, "weights": weights_sha256}
    digest.update(json.dumps(head, sort_keys=True).encode() + b"\n")
    for entry in _file_entries(source):
        digest.update(json.dumps(entry).encode() + b"\n")
    return digest.hexdigest()[:16]


# -- reading -----------------------------------------------------------------------------------------
def _is_folder(source: Source) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir()


def _folder_images(source: str) -> list[Path]:
    """The folder's image files, sorted by relative path (symlinked folders followed once)."""
    root = Path(source).expanduser()
    found: list[Path] = []
    visited: set[str] = set()
    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(
            Path(current) / name
            for name in files
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in _FOLDER_EXTENSIONS
        )
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _shard_urls(source: Source) -> list[str]:
    try:
        return expand_shards(source)  # type: ignore[arg-type]
    except ValueError as error:
        raise ValueError(f"reference set {_describe(source)}: not a folder, and as shards: {error}") from None


def _raw_images(source: Source, counts: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    """(name, encoded bytes) of each image in order; unreadable files and shards go to `counts`."""
    if _is_folder(source):
        for path in _folder_images(str(source)):
            try:
                yield str(path), path.read_bytes()
            except OSError as error:
                counts["unreadable"] = counts.get("unreadable", 0) + 1
                _log.debug("reference image %s unreadable: %s", path, error)
        return

    def on_error(reason: str, detail: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        _log.warning("reference shard problem (%s): %s", reason, detail)

    for url in _shard_urls(source):
        for sample in iter_shard(url, on_error):
            ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if ext is None:
                counts["no_image"] = counts.get("no_image", 0) + 1
                continue
            yield f"{url}:{sample['__key__']}", sample[ext]


def _to_tensor(image: Image.Image, size: int | None) -> torch.Tensor:
    if size is not None:
        return resize_and_crop(image, (size, size), crop="center").pixels
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _file_entries(source: Source) -> list[list[object]]:
    """[path, size, mtime_ns] per file of the source ([url] for a remote shard)."""
    if _is_folder(source):
        entries: list[list[object]] = []
        for path in _folder_images(str(source)):
            try:
                stat = path.stat()
                entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
            except OSError:
                entries.append([str(path), None, None])
        return entries
    entries = []
    for url in _shard_urls(source):
        local = local_tar_path(url)
        if local is None:
            entries.append([url])  # remote: a change is not seen; clear the cache after replacing such shards
            continue
        stat = os.stat(local)
        entries.append([os.path.realpath(local), stat.st_size, stat.st_mtime_ns])
    return entries


def _describe(source: Source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"[{', '.join(map(str, source[:3]))}...]"


def _source_name(source: Source) -> str:
    """A short, file-system-safe name for the cache file (the fingerprint makes it unique)."""
    first = source if isinstance(source, (str, os.PathLike)) else (source[0] if source else "shards")
    name = Path(str(first).rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:48] or "reference"


# -- features and the cache --------------------------------------------------------------------------
def _extract(images: Iterator[torch.Tensor], extractor: InceptionFeatures, max_images: int | None) -> torch.Tensor:
    """Features of the images in batches of extractor.batch_size (a batch ends where the image size changes)."""
    chunks: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    done, start, last_log = 0, time.monotonic(), time.monotonic()

    def flush() -> None:
        nonlocal done, last_log
        if batch:
            chunks.append(extractor(torch.stack(batch)).cpu())
            done += len(batch)
            batch.clear()
        if time.monotonic() - last_log >= PROGRESS_SECONDS:
            last_log = time.monotonic()
            _log.info("reference features: %d images, %.1f images/s", done, done / (last_log - start))

    for count, image in enumerate(images, start=1):
        if batch and image.shape != batch[0].shape:
            flush()
        batch.append(image)
        if len(batch) >= extractor.batch_size:
            flush()
        if max_images is not None and count >= max_images:
            break
    flush()
    return torch.cat(chunks) if chunks else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


def _read_cache(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return torch.from_numpy(data["features"].astype(np.float64))
    except Exception as error:  # a damaged cache file is recomputed, never trusted
        _log.warning("reference feature cache %s unreadable (%s): recomputing", path, error)
        return None


def _write_cache(path: Path, features: torch.Tensor, skipped: dict[str, int]) -> None:
    """float32 on disk: the network's output is float32, so nothing is lost."""
    buffer = io.BytesIO()
    np.savez(buffer, features=features.numpy().astype(np.float32), skipped=json.dumps(skipped, sort_keys=True))
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))

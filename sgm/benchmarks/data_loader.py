"""Time the data path: JPEG shards through BucketedLoader against a plain PIL loop, and cached latents.

    python -m sgm.benchmarks.data_loader --resolution 256 512 1024 --workers 1 --batches 8
    python -m sgm.benchmarks.data_loader --shards 'shards/{00000..00009}.tar' --json bench.json

Figures, each the median over --repeats runs (a shared CPU is noisy):
- images/s per worker of BucketedLoader (square bucket at each resolution, and the multi-aspect
  table) with --workers DataLoader workers, wall clock after the first batch (start-up
  excluded), divided by the worker count;
- images per CPU-second of the same loader in this process (num_workers=0, finite, whole
  epochs: at least --batches x --batch-size images), and of a plain loop over the same images
  as often: PIL open + full decode + RGB, bicubic resize to cover the same bucket, center crop,
  to a uint8 array (the baseline). ratio = loader / plain (median of alternating pairs). The
  loader draft-decodes JPEGs at least twice the bucket (decode.py): target ratio >= 2.5 at 256 px
  on photo-sized JPEGs. With --no-draft the loader decodes fully too, and overhead =
  plain / loader - 1 is the CPU cost of everything else (tar reading, shuffling, json, EXIF,
  bucketing, crop recording, CHW tensors, batching); target <= 10%. CPU time, not wall time, so
  other jobs on the machine disturb it less;
- samples/s of LatentLoader in this process (one core) over cached-latent shards in the
  latent_cache format, latents alone and with SDXL-sized text embeddings; target >= 1500.
Without --shards the benchmark writes its own: photo-like JPEGs (gradients, hard edges, noise;
about 2.2 bits per pixel at quality 90) of photo sizes (1.3 to 2.1 megapixels, six aspect
ratios), and synthetic latents of the bucket sizes. Denser JPEGs decode slower at any scale
(Huffman decoding, which draft mode does not reduce, dominates), so draft decoding gains less
on them: uniform +-24 noise on every channel (3.2 bits per pixel) gives about 2.3x at 256 px.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sgm.data.buckets import assign_bucket, bucket_table, square_table
from sgm.data.crop import covering_size
from sgm.data.latent_cache import latent_members
from sgm.data.latent_loader import LatentLoader
from sgm.data.loader import BucketedLoader
from sgm.data.samples import IMAGE_EXTENSIONS
from sgm.data.shard_list import expand_shards, iter_shard

PHOTO_SIZES = ((1024, 1365), (1365, 1024), (1200, 1200), (1080, 1920), (1920, 1080), (1024, 1536))  # (h, w)
SDXL_TEXT = {"0.0": (77, 768), "1.0": (77, 1280), "1.1": (1280,)}
OVERHEAD_TARGET, LATENT_TARGET = 0.10, 1500.0
DRAFT_TARGETS = {256: 2.5}  # loader / plain images per CPU-second with draft decoding, by resolution


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def make_jpeg_shards(
    root: Path, num_shards: int = 4, per_shard: int = 6, sizes: Sequence[tuple[int, int]] = PHOTO_SIZES, seed: int = 0
) -> list[str]:
    """img2dataset-style shards of photo-like JPEGs (quality 90) of the given (h, w) sizes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    for shard in range(num_shards):
        members = []
        for _ in range(per_shard):
            height, width = sizes[index % len(sizes)]
            pixels = photo_pixels(height, width, rng)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            key = f"{shard:05d}{index:04d}"
            meta = {"key": key, "width": width, "height": height, "original_width": width, "original_height": height}
            members += [
                (f"{key}.jpg", buffer.getvalue()),
                (f"{key}.txt", f"image {index}".encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
            index += 1
        shards.append(_write_tar(root / f"{shard:05d}.tar", members))
    return shards


def photo_pixels(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3]: smooth colour gradients, a checkerboard of hard edges, sigma-8 noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.3)
    base = np.stack(
        [128 + 100 * np.sin(x / 97 + phase), 128 + 90 * np.cos(y / 131 + phase), (x + y) * 200 / (width + height)], -1
    )
    base[(x // 160 + y // 160) % 2 == 0] *= 0.6
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def make_latent_shards(
    root: Path, buckets: Sequence[tuple[int, int]], num_samples: int, text: bool, num_shards: int = 4, seed: int = 0
) -> list[str]:
    """Cached-latent shards (latent_cache format) with random fp16 latents over the bucket sizes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_shard = -(-num_samples // num_shards)
    shards = []
    for shard in range(num_shards):
        members = []
        for index in range(shard * per_shard, min(num_samples, (shard + 1) * per_shard)):
            height, width = buckets[index % len(buckets)]
            latent = rng.standard_normal((4, height // 8, width // 8)).astype(np.float16)
            meta = {
                "key": f"{index:09d}",
                "caption": f"image {index}",
                "original_size_as_tuple": [height, width],
                "crop_coords_top_left": [0, 0],
                "target_size_as_tuple": [height, width],
            }
            embeddings = None
            if text:
                embeddings = {
                    name: torch.from_numpy(rng.standard_normal(shape).astype(np.float16))
                    for name, shape in SDXL_TEXT.items()
                }
            members += latent_members(f"{index:09d}", latent, meta, embeddings)
        shards.append(_write_tar(root / f"{shard:05d}.tar", members))
    return shards


def read_images(shards: Sequence[str]) -> list[bytes]:
    """The image bytes of every sample, in shard order (the plain loop's input)."""
    images = []
    for shard in shards:
        for raw in iter_shard(shard, lambda *_: None):
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            if ext:
                images.append(raw[ext])
    if not images:
        raise ValueError(f"no images found in {list(shards)[:3]}; give img2dataset-format shards")
    return images


def plain_loop(images: Sequence[bytes], table: Sequence[tuple[int, int]], count: int) -> tuple[float, float]:
    """(wall, CPU) images/s of decode + RGB + bicubic cover-resize + center crop + uint8 array."""
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(count):
        image = Image.open(io.BytesIO(images[index % len(images)])).convert("RGB")
        th, tw = table[assign_bucket(image.height, image.width, table)]
        rh, rw = covering_size(image.height, image.width, th, tw)
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
        top, left = (rh - th) // 2, (rw - tw) // 2
        np.asarray(image.crop((left, top, left + tw, top + th)))
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def time_loader(make_loader: Callable[[], Any], batches: int) -> tuple[float, float]:
    """(wall, CPU of this process) samples/s over `batches` batches after the first one.

    Samples are counted as batched (samples_seen counts distinct samples, once, so not a second
    pass); a multi-aspect stream that is still filling its buckets reads a few more than that, so
    its figure is slightly low. The CPU rate is meaningful with num_workers=0."""
    loader = make_loader()
    iterator: Iterator[dict] = iter(loader)
    next(iterator)
    seen, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        seen += len(next(iterator)["__key__"])
    rates = seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu)
    loader.close()
    return rates


def time_epochs(make_loader: Callable[[], Any]) -> float:
    """CPU images/s of a finite in-process loader run to its end: every image its num_epochs times.

    Images are counted as batched: a finite stream flushes every partial bucket at its end."""
    loader = make_loader()
    seen, cpu = 0, time.process_time()
    for batch in loader:
        seen += len(batch["__key__"])
    return seen / (time.process_time() - cpu)


def median_of(repeats: int, measure: Callable[[], tuple[float, ...]]) -> tuple[float, ...]:
    """Each figure's median over `repeats` runs."""
    runs = [measure() for _ in range(repeats)]
    return tuple(statistics.median(run[i] for run in runs) for i in range(len(runs[0])))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All figures; generated shards go to --work-dir, or to a temp folder removed afterwards (~650 MB)."""
    if args.work_dir:
        return run_in(Path(args.work_dir), args)
    with tempfile.TemporaryDirectory(prefix="sgm-data-bench-") as work:
        return run_in(Path(work), args)


def run_in(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The figures, with any generated shards written under `work`."""
    if args.shards:
        shards = expand_shards(args.shards)
    else:
        shards = make_jpeg_shards(work / "jpeg", per_shard=args.images_per_shard)
    images = read_images(shards)
    results: dict[str, Any] = {
        "workers": args.workers,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "repeats": args.repeats,
        "images": len(images),
        "draft_decode": not args.no_draft,
        "jpeg": [],
        "latents": [],
    }
    torch.set_num_threads(1)
    epochs = max(1, -(-args.batches * args.batch_size // len(images)))  # whole epochs for the CPU figures
    for resolution in args.resolution:
        for layout, table in (("square", square_table(resolution)), ("multi-aspect", bucket_table(resolution))):
            table_arg = {"square_size": resolution} if layout == "square" else {"base_resolution": resolution}

            def make(workers: int, epochs: int | None = None, table_arg: dict = table_arg) -> BucketedLoader:
                return BucketedLoader(
                    shards,
                    batch_size=args.batch_size,
                    num_workers=workers,
                    seed=0,
                    shuffle_buffer=8,
                    num_epochs=epochs,
                    draft_decode=not args.no_draft,
                    **table_arg,
                )

            # Both sides process the same multiset of images (whole epochs), alternating, and the
            # overhead is the median of the paired ratios: a slow spell on a shared machine hits
            # both sides of a pair, and image sizes (which set the cost) are balanced.
            pairs = [
                (time_epochs(lambda: make(0, epochs)), plain_loop(images, table, epochs * len(images))[1])
                for _ in range(args.repeats)
            ]
            per_worker = None
            if args.workers > 0:
                wall, _ = median_of(args.repeats, lambda: time_loader(lambda: make(args.workers), args.batches))
                per_worker = wall / args.workers
            results["jpeg"].append(
                {
                    "resolution": resolution,
                    "buckets": layout,
                    "images_per_cpu_s": statistics.median(p[0] for p in pairs),
                    "plain_images_per_cpu_s": statistics.median(p[1] for p in pairs),
                    "ratio": statistics.median(loader / plain for loader, plain in pairs),
                    "overhead": statistics.median(plain / loader - 1.0 for loader, plain in pairs),
                    "images_per_s_per_worker": per_worker,
                }
            )
        for text in (False, True):
            root = work / f"latents-{resolution}-{'text' if text else 'plain'}"
            latent_shards = make_latent_shards(root, bucket_table(resolution), args.latent_samples, text)

            def make_latents(latent_shards: list[str] = latent_shards, text: bool = text) -> LatentLoader:
                return LatentLoader(
                    latent_shards, batch_size=args.batch_size, num_workers=0, shuffle_buffer=64, text_embeddings=text
                )

            batches = max(1, args.latent_samples // args.batch_size // 2)
            wall, cpu = median_of(args.repeats, lambda batches=batches: time_loader(make_latents, batches))
            results["latents"].append(
                {"resolution": resolution, "text_embeddings": text, "samples_per_cpu_s": cpu, "samples_per_s": wall}
            )
    return results


def format_table(results: dict[str, Any]) -> str:
    workers, draft = results["workers"], results["draft_decode"]
    lines = [
        (
            f"JPEG path: BucketedLoader ({'draft' if draft else 'full'} decoding) vs plain full-decode PIL loop "
            f"on the same {results['images']} images, batch {results['batch_size']}, median of "
            f"{results['repeats']}; per CPU-second in one process (num_workers=0), and wall-clock per "
            f"worker with {workers} worker(s)"
        ),
        (
            f"{'res':>5} {'buckets':<13} {'loader img/cpu-s':>17} {'plain img/cpu-s':>16} {'ratio':>6} "
            f"{'overhead':>9} {'loader img/s/worker':>20}"
        ),
    ]
    for row in results["jpeg"]:
        if draft:
            target = DRAFT_TARGETS.get(row["resolution"])
            flag = "" if target is None or row["ratio"] >= target else f"  (< {target}x target)"
            overhead = "-"  # the loader decodes less than the baseline: its own overhead is hidden
        else:
            flag = "" if row["overhead"] <= OVERHEAD_TARGET else "  (> 10% target)"
            overhead = f"{row['overhead']:.1%}"
        worker = "-" if row["images_per_s_per_worker"] is None else f"{row['images_per_s_per_worker']:.1f}"
        lines.append(
            f"{row['resolution']:>5} {row['buckets']:<13} {row['images_per_cpu_s']:>17.1f} "
            f"{row['plain_images_per_cpu_s']:>16.1f} {row['ratio']:>5.2f}x {overhead:>9} {worker:>20}{flag}"
        )
    lines += [
        "",
        "cached latents: LatentLoader in one process (num_workers=0)",
        f"{'res':>5} {'text emb.':<10} {'samples/cpu-s':>14} {'samples/s':>10}",
    ]
    for row in results["latents"]:
        flag = "" if row["samples_per_cpu_s"] >= LATENT_TARGET else "  (< 1500 target)"
        lines.append(
            f"{row['resolution']:>5} {'yes' if row['text_embeddings'] else 'no':<10} "
            f"{row['samples_per_cpu_s']:>14.0f} {row['samples_per_s']:>10.0f}{flag}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="*", help="img2dataset shards (default: generate photo-sized JPEGs)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (0: in this process)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per figure")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="figures are the median of this many runs")
    parser.add_argument("--images-per-shard", type=int, default=6, help="generated JPEGs per shard (4 shards)")
    parser.add_argument("--latent-samples", type=int, default=512, help="generated cached samples per resolution")
    parser.add_argument("--no-draft", action="store_true", help="loader decodes fully (measures its overhead)")
    parser.add_argument("--work-dir", help="where generated shards go (default: a temp folder, removed afterwards)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Precompute VAE latents (and optionally text embeddings) of image shards once, for training.

Each input shard is read by its own finite image stream (stream.SlotStream with num_epochs=1,
no shuffle, no flip, the training bucket table and crop mode), so every sample gets the same
decode, bucket, resize, crop and micro-conditioning as image training would give it. Batches
of one bucket go through the VAE (float32 or bfloat16, never float16) and, with
text_embeddings, through the conditioner's text embedders; the results are written as a new
shard with the SAME NAME in the output folder (format: latent_loader.py). The output order is
the stream's (grouped by bucket), not the input's.

Determinism: the crop RNG of shard NAME uses seed `shard_seed(seed, NAME)` (so the k-th
samples of different shards get independent crops), and the posterior noise of each sample is
drawn from its own generator seeded by (seed, NAME, key), so latents do not depend on the
batch size, the device count or which rank cached the shard.

Resumable by shard: a shard is written to NAME.tmp and renamed when complete, next to
NAME_stats.json (its counts); a finished NAME is skipped on restart. Ranks take disjoint slices
of the sorted shard list (shards[rank::world_size]). `_cache_config.json` records the settings;
a restart with other settings into the same folder is refused. With text embeddings the empty
caption's outputs go to `_empty_caption.safetensors`, for caption dropout without the encoders.
A shard that cannot be opened is reported and left unwritten, so a restart retries it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save, save_file
from tqdm import tqdm

from sgm.data.buckets import bucket_table, square_table
from sgm.data.latent_loader import (
    CACHE_CONFIG_FILE,
    EMPTY_CAPTION_FILE,
    LATENT_EXT,
    META_EXT,
    TEXT_EXT,
    read_text_embeddings,
)
from sgm.data.samples import ImageProcessor, ImageSample
from sgm.data.shard_list import expand_shards, shard_name
from sgm.data.stream import SlotStream, StreamConfig
from sgm.models.sdxl import SDXL

# 2: originals of EXIF orientation 5-8 photos are upright (h, w); a format-1 folder may hold them
# swapped, so resuming into one is refused (the recorded format differs).
CACHE_FORMAT = 2
LATENT_MODES, VAE_DTYPES, STORAGE_DTYPES = ("sample", "mean"), ("float32", "bfloat16"), ("float16", "float32")


@dataclass(frozen=True)
class CacheConfig:
    """The settings that determine the cached bytes (recorded in _cache_config.json)."""

    model: str = "tiny"  # model config name or YAML path, or a label (recorded; the caller builds the model)
    checkpoint: str | None = None
    base_resolution: int | None = None  # exactly one of base_resolution / square_size
    square_size: int | None = None
    crop: str = "random"
    seed: int = 0
    latent_mode: str = "sample"
    vae_dtype: str = "float32"
    storage_dtype: str = "float16"
    text_embeddings: bool = False
    bucket_by: str = "decoded"
    min_size: int | None = None
    max_pixels: int | None = 178_956_970
    bucket_no_upscale: bool = False  # as the image loader's: small images go to a smaller bucket of their aspect

    def __post_init__(self) -> None:
        problems = []
        if (self.base_resolution is None) == (self.square_size is None):
            problems.append("give exactly one of base_resolution (multi-aspect) or square_size")
        choices = {"latent_mode": LATENT_MODES, "vae_dtype": VAE_DTYPES, "storage_dtype": STORAGE_DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("invalid latent cache settings: " + "; ".join(problems))
        self.image_processor()  # validates crop, bucket_by, min_size

    def buckets(self) -> tuple[tuple[int, int], ...]:
        table = bucket_table(self.base_resolution) if self.base_resolution else square_table(self.square_size or 0)
        return tuple(tuple(b) for b in table)  # type: ignore[misc]

    def image_processor(self) -> ImageProcessor:
        return _CacheImageProcessor(
            buckets=self.buckets(),
            crop=self.crop,
            bucket_by=self.bucket_by,
            min_size=self.min_size,
            max_pixels=self.max_pixels,
            draft_decode=False,  # a cache is encoded once, by the VAE: keep its pixels the full decode's
            bucket_no_upscale=self.bucket_no_upscale,
        )

    def record(self, scale_factor: float) -> dict[str, Any]:
        settings = asdict(self)
        if not self.bucket_no_upscale:  # recorded only when on: caches made before it existed still resume
            del settings["bucket_no_upscale"]
        return {
            "format": CACHE_FORMAT,
            **settings,
            "buckets": [list(b) for b in self.buckets()],
            "scale_factor": scale_factor,
        }


class _CacheImageProcessor(ImageProcessor):
    """The training image path, keeping each sample's own aesthetic_score (or None) for its json."""

    def collate(self, samples: Sequence[ImageSample]) -> dict[str, Any]:
        batch = super().collate(samples)
        batch["aesthetic_scores"] = [s.aesthetic_score for s in samples]
        return batch


@dataclass
class CacheSummary:
    """What a run did: shards written / already complete / unreadable, samples, bad counts."""

    written: list[str] = field(default_factory=list)
    skipped_complete: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    samples: int = 0
    bad: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "skipped_complete": self.skipped_complete,
            "failed": self.failed,
            "samples": self.samples,
            "bad": dict(sorted(self.bad.items())),
        }

    def format(self) -> str:
        lines = [
            (
                f"cached {self.samples} samples in {len(self.written)} shard(s); "
                f"{len(self.skipped_complete)} shard(s) already complete, skipped"
            )
        ]
        if self.bad:
            lines.append("samples skipped by reason: " + ", ".join(f"{r}={c}" for r, c in sorted(self.bad.items())))
        if self.failed:
            shown = ", ".join(self.failed[:5])
            lines.append(f"{len(self.failed)} shard(s) could not be read (rerun to retry): {shown}")
        return "\n".join(lines)


def _hash64(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "little")


def shard_seed(seed: int, name: str) -> int:
    """The stream seed of shard `name` (crop RNG), independent of where the shard is listed."""
    return _hash64("crop", seed, name)


def output_name(url: str) -> str:
    """NAME.tar for an input shard path or URL (also `pipe:...`): its last path segment with .tar."""
    tokens = [t for t in re.split(r"\s+", url.removeprefix("pipe:")) if ".tar" in t]
    if not tokens:
        raise ValueError(f"cannot name the output shard for {url!r}: give input shards whose names contain .tar")
    base = shard_name(url)  # the same name the validation holdout hashes
    return base[: base.index(".tar")] + ".tar"


def rank_shards(shards: str | Sequence[str], rank: int, world_size: int) -> list[tuple[str, str]]:
    """(input url, output name) pairs of this rank: a disjoint slice of the expanded list."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    urls = expand_shards(shards)
    names = [output_name(u) for u in urls]
    repeated = sorted(n for n, c in Counter(names).items() if c > 1)
    if repeated:
        raise ValueError(f"input shards share output names {repeated[:5]}; cache each folder into its own --out")
    return list(zip(urls, names))[rank::world_size]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def latent_members(
    key: str, latent: np.ndarray, meta: dict[str, Any], text: dict[str, torch.Tensor] | None = None
) -> list[tuple[str, bytes]]:
    """The tar members of one cached sample (format: latent_loader.py)."""
    members = [(f"{key}.{META_EXT}", json.dumps(meta).encode()), (f"{key}.{LATENT_EXT}", npy_bytes(latent))]
    if text is not None:
        members.append((f"{key}.{TEXT_EXT}", save({k: v.contiguous() for k, v in text.items()})))
    return members


class _TarWriter:
    """Members go to NAME.tmp as they come; `commit` renames it, so a crash never leaves a
    partial shard under its final name (and memory holds one batch, not the shard)."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w")  # noqa: SIM115 - closed by commit() or abort()

    def add(self, members: Sequence[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _check_config(out_dir: Path, record: dict[str, Any]) -> None:
    path = out_dir / CACHE_CONFIG_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [
            f"{k}: {saved.get(k)!r} -> {record.get(k)!r}"
            for k in sorted(set(saved) | set(record))
            if saved.get(k) != record.get(k)
        ]
        if diff:
            raise ValueError(
                f"{out_dir} holds latents cached with other settings ({'; '.join(diff)}). "
                "Use the same settings to resume, or another --out folder."
            )
    _write_json_atomic(path, record)


@torch.no_grad()
def encode_batch(model: SDXL, batch: dict[str, Any], config: CacheConfig, shard: str) -> tuple[torch.Tensor, dict]:
    """(scaled latents [B, C, h, w] float32 on CPU, {index: outputs} of the text embedders)."""
    device = next(model.vae.parameters()).device
    images = batch["jpg"].to(device).float() / 127.5 - 1.0
    posterior = model.vae.encode(images)
    latents = posterior.mean.float()
    if config.latent_mode == "sample":
        seeds = [_hash64("noise", config.seed, shard, key) >> 1 for key in batch["__key__"]]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        latents = latents + posterior.std.float() * noise.to(device)
    text = {}
    if config.text_embeddings:
        conditioner = model.conditioner
        text = {i: conditioner.embedder_outputs(i, batch["txt"]) for i in conditioner.text_embedder_indices()}
    return (latents * model.scale_factor).cpu(), text


def cache_shard(
    model: SDXL, url: str, name: str, out_dir: Path, config: CacheConfig, batch_size: int
) -> dict[str, Any]:
    """Cache one input shard into out_dir/name; returns its stats {"samples", "bad", "written"}."""
    stream_config = StreamConfig(
        shards=(url,),
        buckets=(),
        batch_size=batch_size,
        seed=shard_seed(config.seed, name),
        shuffle_buffer=0,
        num_epochs=1,
        heartbeat_every=1 << 30,
        processor=config.image_processor(),
    )
    storage = getattr(torch, config.storage_dtype)
    writer = _TarWriter(out_dir / name)
    samples, snapshot = 0, {}
    try:
        for batch, snapshot in SlotStream(stream_config, 0, 1):  # noqa: B007 - read after the loop
            if batch is None:
                continue
            latents, text = encode_batch(model, batch, config, name)
            for b, key in enumerate(batch["__key__"]):
                meta = {"key": key, "caption": batch["txt"][b]}
                for cond in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
                    meta[cond] = batch[cond][b].tolist()
                if batch["aesthetic_scores"][b] is not None:
                    meta["aesthetic_score"] = batch["aesthetic_scores"][b]
                own = {f"{i}.{j}": out[b].to("cpu", storage) for i, outs in text.items() for j, out in enumerate(outs)}
                writer.add(latent_members(key, latents[b].to(storage).numpy(), meta, own or None))
                samples += 1
    except BaseException:
        writer.abort()
        raise
    stats = {"samples": samples, "bad": dict(snapshot.get("bad", {})), "written": False, "source": url}
    if stats["bad"].get("unreadable_shard"):
        writer.abort()
        return stats
    stats["written"] = True
    _write_json_atomic(out_dir / f"{name[: -len('.tar')]}_stats.json", stats)
    writer.commit()
    return stats


def cache_latents(
    model: SDXL,
    shards: str | Sequence[str],
    out_dir: str | os.PathLike,
    config: CacheConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> CacheSummary:
    """Cache this rank's slice of `shards` into out_dir (rank/world_size default to $RANK/$WORLD_SIZE)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    vae_dtype = next(model.vae.parameters()).dtype
    if vae_dtype != getattr(torch, config.vae_dtype):
        raise ValueError(
            f"the model's VAE is {vae_dtype} but the cache settings say vae_dtype={config.vae_dtype} (float16 is "
            "never used: it overflows); build the model with load_caching_model(config) or cast model.vae"
        )
    mine = rank_shards(shards, rank, world_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config.record(model.scale_factor))
    if config.text_embeddings:
        _write_empty_caption(model, out)
    summary = CacheSummary()
    bar = tqdm(mine, desc=f"rank {rank} shards", unit="shard", disable=not progress, file=sys.stderr)
    for url, name in bar:
        if (out / name).is_file():
            summary.skipped_complete.append(name)
            continue
        stats = cache_shard(model, url, name, out, config, batch_size)
        summary.bad.update(stats["bad"])
        summary.samples += stats["samples"]
        (summary.written if stats["written"] else summary.failed).append(name)
        bar.set_postfix(samples=summary.samples)
    return summary


@torch.no_grad()
def _write_empty_caption(model: SDXL, out: Path) -> None:
    conditioner = model.conditioner
    tensors = {
        f"{i}.{j}": o[0].float().cpu()
        for i in conditioner.text_embedder_indices()
        for j, o in enumerate(conditioner.embedder_outputs(i, [""]))
    }
    tmp = out / f"{EMPTY_CAPTION_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / EMPTY_CAPTION_FILE)


def read_empty_caption(cache_dir: str | os.PathLike) -> dict[int, tuple[torch.Tensor, ...]]:
    """The empty caption's text-embedder outputs stored by the cache, for
    Conditioner.set_empty_caption_outputs (caption dropout without loading the encoders)."""
    path = Path(cache_dir) / EMPTY_CAPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: cache with text embeddings (--text-embeddings) to get it")
    return read_text_embeddings(path.read_bytes())  # the same "{embedder}.{output}" naming as each sample


def load_caching_model(
    config: CacheConfig, device: str | torch.device = "cpu", model_config: Mapping[str, Any] | None = None
) -> SDXL:
    """The VAE (and text encoders) of `config.model` (or of `model_config`, a run's model config, when
    given), from `config.checkpoint` when given.

    With a checkpoint the model is built on the meta device and only the needed parts are
    materialised (no UNet memory); without one the weights are random, seeded by config.seed
    (tests and smoke runs only).
    """
    from sgm.checkpoint.io import load_checkpoint
    from sgm.models.build import build_model

    parts = ["vae"] + (["text_encoders"] if config.text_embeddings else [])
    source = config.model if model_config is None else OmegaConf.create(dict(model_config))
    if config.checkpoint is None:
        print(f"warning: no checkpoint given; {config.model} has random weights (tests only)", file=sys.stderr)
        torch.manual_seed(config.seed)
        model = build_model(source)
    else:
        model = build_model(source, device="meta")
        model.vae.to_empty(device="cpu")
        if config.text_embeddings:
            model.conditioner.to_empty(device="cpu")
        load_checkpoint(model, config.checkpoint, parts=parts)
    model.freeze_frozen_parts()
    model.vae.to(device, getattr(torch, config.vae_dtype))
    if config.text_embeddings:
        model.conditioner.to(device)
    return model

"""Latents of a folder build, encoded once by the run's own VAE: `data=folder data.cache_latents=true`.

Training then reads latents (latent_loader.LatentLoader) and never runs the VAE encoder. What it does,
and the choices made:

- The encoder: the run's model config and its `pretrained` file, which configs/data/folder.yaml passes
  by reference (`data.run`), so the latents are those of the VAE the run holds. A run without a
  pretrained file (or with `vae` left out of pretrained_parts) holds a VAE of random weights: such a
  run is refused, naming the fix, rather than cached with a VAE other than its own.
- The samples: latent_cache.cache_latents over the folder's shards with the run's bucket table,
  bucket_no_upscale, crop mode, min_size, max_pixels and seed, so every image is decoded, bucketed,
  resized and cropped as the image loader would, then encoded once (a posterior sample, as training
  draws). `cache_text_embeddings` stores the text encoders' outputs too; refused when module.trainable
  trains a text encoder (its outputs change as it trains).
- The trade-off: each image keeps the one crop it was cached with (repeats read that same crop) and
  is never flipped (data.flip_probability must be 0).
- The cache: `<folder build>-latents-<hash16>` beside the folder build, hash16 over the build's name
  (its fingerprint), the sha256 of the file's VAE tensors (and text-encoder tensors), the VAE (and
  embedder) configs and the cache settings; not the file's path, so a copy of the same file reuses it.
  Built once as the folder is (folder.build_once: lock file, temporary folder renamed into place;
  other processes wait, then reuse). An unchanged folder and VAE reuse it, nothing is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sgm.checkpoint.fingerprints import tensors_sha256
from sgm.checkpoint.official_layout import EMBEDDER_PREFIX, PARTS, VAE_PREFIX
from sgm.checkpoint.pretrained import require_pretrained_file
from sgm.data.folder import FolderShards, build_once, completed_build
from sgm.data.latent_cache import CacheConfig, cache_latents, load_caching_model
from sgm.data.latent_loader import LatentLoader
from sgm.data.shards import write_json_atomic

LATENTS_MARKER = "_folder_latents.json"  # written last into a complete cache
LATENTS_FORMAT = 1  # part of the fingerprint: bump when what a cache holds changes
MODEL_LABEL = "data.run.model"  # CacheConfig.model: the run's model config, recorded in the marker's fingerprint
IMAGE_ONLY = ("flip_probability", "crop", "bucket_by", "min_size", "max_pixels", "draft_decode", "buckets")
TEXT_ENCODER = re.compile(r"text_encoder_\d+")  # module.trainable's name of a text tower
_log = logging.getLogger(__name__)


@dataclass
class FolderLatents:
    """A complete latent cache: where, its shards, how many samples."""

    path: Path
    shards: list[str]
    samples: int
    bad: dict[str, int] = field(default_factory=dict)
    built: bool = False  # False: an earlier cache was reused


@dataclass(frozen=True)
class LatentRequest:
    """Checked cache settings and the run's model config; `loader` encodes (or reuses) and reads them."""

    settings: CacheConfig
    model_config: dict[str, Any]

    @classmethod
    def checked(
        cls,
        run: Mapping[str, Any],
        *,
        text_embeddings: bool,
        cache_latents: bool,
        from_folder: bool,
        base_resolution: int | None,
        square_size: int | None,
        bucket_no_upscale: bool,
        options: Mapping[str, Any],
    ) -> LatentRequest:
        """The request, or a ValueError naming the data.* (or run) key to change."""
        if not cache_latents:
            raise ValueError(
                "data.cache_text_embeddings=true needs data.cache_latents=true (the text embeddings are stored "
                "beside the latents). Fix: data.cache_latents=true, or data.cache_text_embeddings=false"
            )
        if not from_folder:
            raise ValueError(
                "data.cache_latents=true caches a data.folder build. Fix: set data.folder, or for prebuilt "
                "webdataset files run data/cache_latents.py and train with data=cached_latents"
            )
        if not run.get("model"):
            raise ValueError(
                "data.run.model is not set: data.cache_latents=true encodes with the run's model, which "
                "configs/data/folder.yaml passes by reference. Fix: use data=folder within train.py's config"
            )
        _check_sources(run, text_embeddings)
        flip = options.get("flip_probability") or 0.0
        if flip:
            raise ValueError(
                f"data.flip_probability={flip}: cached latents keep one crop of each image, never flipped. "
                "Fix: data.flip_probability=0.0, or data.cache_latents=false to flip while training from images"
            )
        if options.get("buckets") is not None:
            raise ValueError("data.buckets: cached folder latents take data.base_resolution or data.square_size")
        if (base_resolution is None) == (square_size is None):
            raise ValueError(
                "give exactly one of data.base_resolution (multi-aspect buckets) or data.square_size "
                f"(fixed-size stage); got {base_resolution=}, {square_size=}"
            )
        settings = CacheConfig(
            model=MODEL_LABEL,
            checkpoint=str(run["pretrained"]),
            base_resolution=base_resolution,
            square_size=square_size,
            crop=options.get("crop", "random"),
            seed=int(options.get("seed", 0)),
            text_embeddings=text_embeddings,
            bucket_by=options.get("bucket_by", "decoded"),
            min_size=options.get("min_size"),
            max_pixels=options.get("max_pixels", 178_956_970),
            bucket_no_upscale=bucket_no_upscale,
        )
        return cls(settings, dict(run["model"]))

    def loader(self, built: FolderShards, repeats: int, options: Mapping[str, Any], verbose: bool) -> LatentLoader:
        """A LatentLoader over the cache of `built` (encoded now, or reused), its shard list `repeats` times."""
        cached = cache_folder_latents(
            built, self.settings, self.model_config, batch_size=int(options.get("batch_size", 8)), verbose=verbose
        )
        return LatentLoader(
            cached.shards * repeats,
            text_embeddings=self.settings.text_embeddings,
            base_resolution=self.settings.base_resolution,
            square_size=self.settings.square_size,
            **{key: value for key, value in options.items() if key not in IMAGE_ONLY},
        )


def _check_sources(run: Mapping[str, Any], text_embeddings: bool) -> None:
    """The run's VAE (and text encoders) come from its pretrained file, and no cached part trains."""
    parts = run.get("pretrained_parts")
    loaded = list(PARTS) if parts is None else [parts] if isinstance(parts, str) else list(parts)
    if not run.get("pretrained") or "vae" not in loaded:
        raise ValueError(
            "data.cache_latents=true encodes with the VAE the run loads from `pretrained`, but this run's VAE "
            "has random weights (no pretrained file, or pretrained_parts without vae). Fix: "
            "pretrained=/path/to/model.safetensors (with vae in pretrained_parts), or data.cache_latents=false"
        )
    if not text_embeddings:
        return
    if "text_encoders" not in loaded:
        raise ValueError(
            "data.cache_text_embeddings=true encodes with the text encoders the run loads from `pretrained`, "
            "but pretrained_parts leaves them out. Fix: data.cache_text_embeddings=false, or add text_encoders "
            "to pretrained_parts"
        )
    trainable = run.get("trainable") or {}
    trained = sorted(
        name
        for name, part in trainable.items()
        if TEXT_ENCODER.fullmatch(str(name)) and (part or {}).get("mode", "full") != "frozen"
    )
    if trained:
        raise ValueError(
            f"data.cache_text_embeddings=true stores the text encoders' outputs, but module.trainable trains "
            f"{', '.join(trained)}, whose outputs change as it trains. Fix: data.cache_text_embeddings=false "
            "(the latents are still cached), or leave the text encoders out of module.trainable"
        )


def weights_fingerprint(pretrained: str | os.PathLike, text_embeddings: bool) -> dict[str, str]:
    """{"vae": sha256 of the file's VAE tensors} (+ "text_encoders"), read from the file by part (no model is
    built, so a reused cache costs one read of the VAE)."""
    path = require_pretrained_file(pretrained)
    prefixes = {"vae": VAE_PREFIX, **({"text_encoders": EMBEDDER_PREFIX} if text_embeddings else {})}
    digests = {}
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        for part, prefix in prefixes.items():
            chosen = [key for key in keys if key.startswith(prefix)]
            if not chosen:
                raise ValueError(
                    f"pretrained={path} holds no {part} weights, which data.cache_latents encodes with. Fix: a "
                    "whole official-layout file, or data.cache_latents=false"
                )
            digests[part] = tensors_sha256({key: handle.get_tensor(key) for key in chosen})
    return digests


def latents_fingerprint(
    build_name: str, weights: Mapping[str, str], settings: CacheConfig, model_config: Mapping[str, Any]
) -> str:
    """hash16 of what the cached bytes depend on (see the module docstring)."""
    record = settings.record(model_config.get("scale_factor"))
    for described in ("model", "checkpoint"):  # by the configs and weight digests below, not by name or path
        record.pop(described)
    head: dict[str, Any] = {
        "format": LATENTS_FORMAT,
        "folder_build": build_name,
        "weights": dict(weights),
        "settings": record,
        "vae": model_config.get("vae"),
    }
    if settings.text_embeddings:
        embedders = (model_config.get("conditioner") or {}).get("embedders") or []
        head["embedders"] = [{k: e.get(k) for k in ("input_key", "module")} for e in embedders]
    return hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encoding_device() -> torch.device:
    """This process's GPU (LOCAL_RANK) when there is one: encoding a folder on the CPU is slow."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cache_folder_latents(
    built: FolderShards,
    settings: CacheConfig,
    model_config: Mapping[str, Any],
    *,
    batch_size: int = 8,
    verbose: bool = True,
) -> FolderLatents:
    """The latent cache of a folder build: reused when complete, else encoded once (see the module docstring)."""
    weights = weights_fingerprint(str(settings.checkpoint), settings.text_embeddings)
    fingerprint = latents_fingerprint(built.path.name, weights, settings, model_config)
    final = built.path.parent / f"{built.path.name}-latents-{fingerprint}"
    found, record = build_once(
        final,
        lambda: _complete(final, fingerprint),
        lambda tmp: _encode(built, tmp, settings, model_config, fingerprint, weights, batch_size, verbose),
    )
    if record is None:
        if verbose:
            _log.info("data.cache_latents: unchanged folder and VAE, reusing %d latents in %s", found.samples, final)
        return found
    found.built = True
    if verbose:
        _report(found, record)
    return found


def _complete(final: Path, fingerprint: str) -> FolderLatents | None:
    found = completed_build(final, LATENTS_MARKER, fingerprint)
    if found is None:
        return None
    record, shards = found
    return FolderLatents(final, shards, record["samples"], dict(record.get("bad", {})))


def _encode(
    built: FolderShards,
    out: Path,
    settings: CacheConfig,
    model_config: Mapping[str, Any],
    fingerprint: str,
    weights: Mapping[str, str],
    batch_size: int,
    verbose: bool,
) -> dict[str, Any]:
    """Encode the build's shards into `out` and write the marker; returns the marker's record."""
    device, start = encoding_device(), time.monotonic()
    if verbose:
        _log.info(
            "data.cache_latents: encoding %d images of %s with the VAE of %s on %s",
            built.written, built.path, settings.checkpoint, device,
        )  # fmt: skip
    model = load_caching_model(settings, device, model_config)
    try:
        summary = cache_latents(
            model, built.shards, out, settings, rank=0, world_size=1, batch_size=batch_size, progress=verbose
        )
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if summary.failed or summary.samples == 0:
        reasons = ", ".join(f"{r}={c}" for r, c in sorted(summary.bad.items())) or "none readable"
        raise ValueError(
            f"data.cache_latents: no latents could be made from {built.path} ({reasons}). Fix: check data.min_size "
            "and the images of data.folder, or data.cache_latents=false"
        )
    record = {
        "format": LATENTS_FORMAT,
        "fingerprint": fingerprint,
        "folder_build": built.path.name,
        "weights": dict(weights),
        "pretrained": str(settings.checkpoint),
        "samples": summary.samples,
        "bad": dict(sorted(summary.bad.items())),
        "shards": sorted(summary.written),
        "seconds": round(time.monotonic() - start, 3),
    }
    write_json_atomic(out / LATENTS_MARKER, record)  # last: its presence marks a complete cache
    return record


def _report(found: FolderLatents, record: Mapping[str, Any]) -> None:
    seconds = max(record["seconds"], 1e-9)
    _log.info(
        "data.cache_latents: encoded %d images into %s (%.1f s, %.1f img/s); later runs reuse it while "
        "data.folder, the VAE and these data settings are unchanged",
        found.samples, found.path, seconds, found.samples / seconds,
    )  # fmt: skip
    if found.bad:
        _log.warning("data.cache_latents: skipped %s", ", ".join(f"{r}={c}" for r, c in found.bad.items()))
    prefix = found.path.name.split("-latents-")[0][:-17]
    same = re.compile(re.escape(prefix) + r"-[0-9a-f]{16}-latents-[0-9a-f]{16}")
    cache_root = found.path.parent
    older = sorted(p.name for p in cache_root.iterdir() if p != found.path and same.fullmatch(p.name))
    if older:
        _log.info("other latent caches of this folder in %s (delete those no run reads): %s", cache_root, older)

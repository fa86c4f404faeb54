"""Train from cached latents: the shards data/cache_latents.py writes, read like image shards.

Format (one webdataset sample per key; written by latent_cache.py):
- `<key>.latent.npy`: scaled latents (x the model's scale_factor, what the UNet sees), [C, h, w],
  float16 (or float32 with --storage-dtype float32), numpy's .npy format (webdataset decodes it);
- `<key>.json`: {"key", "caption", "original_size_as_tuple": [h, w], "crop_coords_top_left":
  [top, left], "target_size_as_tuple": [h, w], optional "aesthetic_score"};
- `<key>.text.safetensors` (with --text-embeddings): the conditioner's text embedders' outputs
  for the caption, tensor "{embedder index}.{output index}", unbatched (e.g. "1.0" [77, 1280],
  "1.1" [1280]); read with safetensors.torch.load(bytes).

`LatentLoader` is the image loader's machinery (loader.SlotLoader: endless per-slot streams
split by rank and worker, equal batch counts, exact resume, counted bad samples) with
`LatentProcessor` as the stream's sample strategy: batches are grouped by latent shape (the
bucket the latents were cached at), no decoding, no RNG per sample. With text_embeddings=True
a batch carries `cached_embeddings` {index: tuple of [B, ...] tensors}, which
Conditioner.forward uses instead of running those embedders (see conditioner.py).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from sgm.data.loader import SlotLoader
from sgm.data.samples import (
    Position,
    Skip,
    aesthetic_score,
    collate_aesthetic,
    positive_int,
    read_json,
)
from sgm.data.shard_list import expand_shards, local_tar_path
from sgm.data.stream import StreamConfig

LATENT_EXT, META_EXT, TEXT_EXT = "latent.npy", "json", "text.safetensors"
EMPTY_CAPTION_FILE = "_empty_caption.safetensors"  # the cache's text-embedder outputs for ""
CACHE_CONFIG_FILE = "_cache_config.json"  # the settings the cache was made with
CONDITIONING_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
# The header numpy writes for a plain C-order array; parsed here without ast (10x faster).
_NPY_HEADER = re.compile(r"\{'descr': '([<|]?[fiub]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}\s*$")


def read_npy(data: bytes) -> np.ndarray:
    """An array from .npy bytes (read-only view); numpy's own reader for unusual headers."""
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        length = int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.match(data[10 : 10 + length].decode("latin1"))
        if match:
            shape = tuple(int(s) for s in match.group(2).split(",") if s.strip())
            return np.frombuffer(data, dtype=match.group(1), offset=10 + length, count=math.prod(shape)).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_text_embeddings(data: bytes) -> dict[int, tuple[torch.Tensor, ...]]:
    """{embedder index: (output 0, output 1, ...)} from a text.safetensors member."""
    grouped: dict[int, dict[int, torch.Tensor]] = {}
    for name, tensor in load_safetensors(data).items():
        index, _, output = name.partition(".")
        grouped.setdefault(int(index), {})[int(output)] = tensor
    return {i: tuple(parts[j] for j in sorted(parts)) for i, parts in sorted(grouped.items())}


@dataclass
class LatentSample:
    key: str
    caption: str
    latent: np.ndarray
    conditioning: tuple[tuple[int, int], ...]  # CONDITIONING_KEYS, in order
    embeddings: dict[int, tuple[torch.Tensor, ...]] | None
    aesthetic_score: float | None


@dataclass(frozen=True)
class LatentProcessor:
    """Cached sample -> (latent shape, sample); a same-shape list -> one batch."""

    text_embeddings: bool = False
    default_aesthetic_score: float | None = None
    needs_rng: bool = False

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "latent",
            "text_embeddings": self.text_embeddings,
            "default_aesthetic_score": self.default_aesthetic_score,
        }

    def process(self, raw: dict[str, Any], position: Position, rng: Any) -> tuple[tuple[int, ...], LatentSample]:
        if "__duplicate__" in raw:
            raise Skip("duplicate_member")
        if LATENT_EXT not in raw:
            raise Skip("missing_latent")
        try:
            latent = read_npy(raw[LATENT_EXT])
        except (ValueError, OSError, EOFError):
            raise Skip("bad_latent") from None
        if latent.ndim != 3 or latent.dtype.kind != "f" or min(latent.shape) < 1:
            raise Skip("bad_latent")
        meta = read_json(raw.get(META_EXT), reason="bad_conditioning")
        if meta is None or not isinstance(meta.get("caption"), str):
            raise Skip("bad_conditioning")
        conditioning = tuple(_pair(meta.get(name)) for name in CONDITIONING_KEYS)
        embeddings = None
        if self.text_embeddings:
            if TEXT_EXT not in raw:
                raise Skip("missing_text_embeddings")
            try:
                embeddings = read_text_embeddings(raw[TEXT_EXT])
            except Exception:
                raise Skip("bad_text_embeddings") from None
        score = aesthetic_score(meta, self.default_aesthetic_score)
        sample = LatentSample(raw["__key__"], meta["caption"], latent, conditioning, embeddings, score)
        return tuple(latent.shape), sample

    def collate(self, samples: Sequence[LatentSample]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "latents": torch.from_numpy(np.stack([s.latent for s in samples])),  # as stored; fp32 in the step
            "txt": [s.caption for s in samples],
            "__key__": [s.key for s in samples],
        }
        for index, name in enumerate(CONDITIONING_KEYS):
            batch[name] = torch.tensor([s.conditioning[index] for s in samples], dtype=torch.long)
        if self.text_embeddings:
            rows = [s.embeddings or {} for s in samples]
            batch["cached_embeddings"] = {
                i: tuple(torch.stack([row[i][j] for row in rows]) for j in range(len(parts)))
                for i, parts in rows[0].items()
            }
        collate_aesthetic(batch, [s.aesthetic_score for s in samples])
        return batch


def _pair(value: Any) -> tuple[int, int]:
    """A recorded (h, w) / (top, left): two whole numbers, sizes positive, crops >= 0."""
    if not isinstance(value, list) or len(value) != 2:
        raise Skip("bad_conditioning")
    pair = tuple(0 if v == 0 and not isinstance(v, bool) else positive_int(v) for v in value)
    if None in pair:
        raise Skip("bad_conditioning")
    return pair  # type: ignore[return-value]


class LatentLoader(SlotLoader):
    """Iterate for batches {"latents" [B, C, h, w] in the stored dtype (fp16 by default; the training
    step upcasts on its device, as it normalises uint8 pixels there), "txt", "original_size_as_tuple",
    "crop_coords_top_left", "target_size_as_tuple", "__key__"} (+ "cached_embeddings",
    "aesthetic_score"), one latent shape per batch."""

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_epochs: int | None = None,
        heartbeat_every: int = 1000,
        text_embeddings: bool = False,
        default_aesthetic_score: float | None = None,
        square_size: int | None = None,
        base_resolution: int | None = None,
        **loader_options: Any,
    ) -> None:
        """`loader_options` are SlotLoader's (num_workers, rank, world_size, batches_per_epoch, ...).

        `square_size` / `base_resolution` (what a stage config sets) do not re-bucket anything: the
        buckets were fixed when caching. When given, they are checked against the cache's
        `_cache_config.json`, so a stage never trains silently on latents of another resolution."""
        processor = LatentProcessor(text_embeddings, default_aesthetic_score)
        config = StreamConfig(
            shards=tuple(expand_shards(shards)),
            buckets=(),
            batch_size=batch_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            num_epochs=num_epochs,
            heartbeat_every=heartbeat_every,
            processor=processor,
        )
        super().__init__(config, **loader_options)
        self._check_cache_resolution(square_size, base_resolution)

    def _cache_dir(self) -> str | None:
        return next((os.path.dirname(p) or "." for p in map(local_tar_path, self.config.shards) if p), None)

    def _check_cache_resolution(self, square_size: int | None, base_resolution: int | None) -> None:
        folder = self._cache_dir()
        path = os.path.join(folder or ".", CACHE_CONFIG_FILE)
        if (square_size is None and base_resolution is None) or folder is None or not os.path.isfile(path):
            return
        with open(path) as file:
            cached = json.load(file)
        wanted = {"square_size": square_size, "base_resolution": base_resolution}
        found = {name: cached.get(name) for name in wanted}
        if found != wanted:
            raise ValueError(
                f"the cached latents in {folder} were made with {found}, but this stage asks for {wanted}. "
                "Cache the shards again for this stage (data/cache_latents.py --square-size / --base-resolution) "
                "and point data.shards at that cache"
            )

    def empty_caption_outputs(self) -> dict[int, tuple[torch.Tensor, ...]] | None:
        """The cache's `_empty_caption.safetensors` (next to the first local shard), for caption
        dropout without running the text encoders; None without text embeddings or such a file."""
        folder = self._cache_dir()
        path = os.path.join(folder or ".", EMPTY_CAPTION_FILE)
        if not self.config.processor.text_embeddings or folder is None or not os.path.isfile(path):
            return None
        with open(path, "rb") as file:
            return read_text_embeddings(file.read())

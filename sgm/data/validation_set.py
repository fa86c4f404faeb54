"""The held-out samples of a validation loss: chosen by key, read once, fixed (no shuffle, flip or random crop).

The selection is the first `max_samples` samples of the shards in key order (ties: the shard's name), so
it does not depend on the shard order, the number of processes or which process reads what. Each sample
goes through the training run's own processor (the image path with the run's bucket table, or the
cached-latent reader), made deterministic: a centre crop, no flip and the full decode (no draft decoding:
the set is read once, and its pixels then equal those a latent cache of the same shards encoded). The
shuffle buffer, bucket buffers and batching of a training stream are not needed here: a sample is kept
alone (as the processor's one-sample batch) and batched with others of its shape when it is scored.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from sgm.data.latent_loader import LATENT_EXT, LatentProcessor
from sgm.data.samples import ImageProcessor, SampleProcessor, Skip
from sgm.data.shard_list import iter_shard, local_tar_path, shard_name, tar_sample_keys

_SAMPLE_DOMAIN = 0  # the stream's RNG domain for per-sample draws (stream.py), for processors that need one


@dataclass(frozen=True)
class HeldOutEntry:
    """One selected sample: its key, where it lies, and its index in the selection (what decides its rank)."""

    index: int
    key: str
    shard: int
    offset: int


def fixed_processor(processor: SampleProcessor) -> SampleProcessor:
    """The training processor without its randomness: centre crop, no flip, full decode (images); others as they are."""
    if isinstance(processor, ImageProcessor):
        return replace(processor, crop="center", flip_probability=0.0, draft_decode=False)
    return processor


def held_out_processor(training: SampleProcessor, shards: Sequence[str]) -> SampleProcessor:
    """The processor for the held-out shards: the training run's, made fixed; a cached-latent reader (without
    cached text embeddings) when the held-out shards hold cached latents but training reads images."""
    samples = iter_shard(shards[0], lambda *_: None)
    first = next(samples, {})
    samples.close()
    if LATENT_EXT in first and not isinstance(training, LatentProcessor):
        return LatentProcessor(
            text_embeddings=False, default_aesthetic_score=getattr(training, "default_aesthetic_score", None)
        )
    return fixed_processor(training)


def select_held_out(shards: Sequence[str], max_samples: int, errors: Counter | None = None) -> list[HeldOutEntry]:
    """The first `max_samples` samples of `shards` by (key, shard name); reads keys only (local tars: the headers)."""
    found: list[tuple[str, str, int, int]] = []
    for shard_id, url in enumerate(shards):
        for offset, key in enumerate(shard_keys(url, errors)):
            found.append((key, shard_name(url), shard_id, offset))
    found.sort()
    return [HeldOutEntry(i, key, shard, offset) for i, (key, _, shard, offset) in enumerate(found[:max_samples])]


def shard_keys(url: str, errors: Counter | None = None) -> list[str]:
    """The sample keys of a shard in order (iter_shard's samples): a local tar's from its headers alone."""
    path = local_tar_path(url)
    if path is not None:
        try:
            with open(path, "rb") as file:
                return list(tar_sample_keys(file))
        except (OSError, tarfile.TarError):
            pass  # read it as iter_shard does, which counts the failure
    return [str(raw["__key__"]) for raw in iter_shard(url, _count_into(errors))]


def read_held_out(
    shards: Sequence[str],
    entries: Iterable[HeldOutEntry],
    processor: SampleProcessor,
    seed: int = 0,
    skipped: Counter | None = None,
) -> dict[int, dict[str, Any]]:
    """{entry index: the processor's one-sample batch} for `entries`; a sample the processor refuses is left
    out and counted in `skipped` by reason."""
    wanted: dict[int, dict[int, HeldOutEntry]] = {}
    for entry in entries:
        wanted.setdefault(entry.shard, {})[entry.offset] = entry
    samples: dict[int, dict[str, Any]] = {}
    for shard_id in sorted(wanted):
        in_shard, remaining = wanted[shard_id], len(wanted[shard_id])
        for offset, raw in enumerate(iter_shard(shards[shard_id], _count_into(skipped))):
            entry = in_shard.get(offset)
            if entry is None:
                continue
            remaining -= 1
            rng = None
            if getattr(processor, "needs_rng", False):
                rng = np.random.default_rng([_SAMPLE_DOMAIN, seed % (1 << 64), 0, shard_id, offset])
            try:
                _, sample = processor.process(raw, (0, shard_id, offset), rng)
                samples[entry.index] = processor.collate([sample])
            except Skip as skip:
                if skipped is not None:
                    skipped[skip.reason] += 1
            if remaining == 0:
                break
    return samples


def stack_inputs(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One batch from one-sample batches of one shape: tensors concatenated, lists joined, cached embeddings
    stacked per embedder; a key that some samples lack (aesthetic_score) is left out, as collate does."""
    keys = [k for k in batches[0] if all(k in b for b in batches)]
    stacked: dict[str, Any] = {}
    for key in keys:
        values = [b[key] for b in batches]
        if isinstance(values[0], torch.Tensor):
            stacked[key] = torch.cat(values)
        elif isinstance(values[0], Mapping):
            stacked[key] = {
                index: tuple(torch.cat([v[index][j] for v in values]) for j in range(len(parts)))
                for index, parts in values[0].items()
            }
        else:
            stacked[key] = [item for value in values for item in value]
    return stacked


def _count_into(counter: Counter | None) -> Any:
    def count(reason: str, detail: str) -> None:
        if counter is not None:
            counter[reason] += 1

    return count


def describe_shards(shards: Sequence[str]) -> str:
    """A short name for a shard list in messages: its folder and count."""
    folders = sorted({os.path.dirname(s) or "." for s in shards})
    return f"{len(shards)} shard(s) in {', '.join(folders[:3])}{' ...' if len(folders) > 3 else ''}"

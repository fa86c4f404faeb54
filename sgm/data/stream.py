"""One data slot's infinite, deterministic stream of bucketed batches, resumable from a snapshot.

Pipeline per slot (a slot is one DataLoader worker of one rank, see shard_list.py):
read -> shuffle buffer -> process -> bucket buffers -> batch.
What "process" does is a strategy (samples.SampleProcessor): by default the image path below
(samples.ImageProcessor); `StreamConfig.processor` swaps in another, e.g. cached latents
(latent_loader.LatentProcessor), bucketed by its own key. Everything else here is shared.
- Read: the slot's shards for the epoch (shard_list.slot_shards: balanced by samples when
  shard_list.shard_sizes can size them, else by count; a snapshot records which, so a resume
  deals as the run did), each read by shard_list.iter_shard. Each raw sample is tagged with its
  position (epoch, shard index in the shard list, sample offset in the shard). Epochs repeat forever (each re-permuted)
  unless `num_epochs` is set (tests, evaluation); a finite stream flushes partial batches.
- Shuffle: a buffer of `shuffle_buffer` raw samples; a numpy Generator picks which one leaves
  as each new one arrives. Its bit_generator.state is plain JSON. Once the slot has read its
  first epoch, the buffer holds at most that many samples (`pass_size`): a dataset smaller than
  the buffer is not read many passes ahead into it.
- Decode: image from the first of jpg/jpeg/png/webp, caption from txt, original size from the
  json's (original_height, original_width) when present (img2dataset stores resized copies),
  swapped to upright when EXIF orientation 5-8 turned the pixels, else the decoded size. The bucket is chosen by the DECODED aspect ratio (`bucket_by`), since
  that is the image that gets cropped; with img2dataset's keep-ratio resize both agree. The
  optional `min_size` filter tests the recorded original size (the resolution the photo had).
  Resize and crop draw from an RNG seeded by (seed, epoch, shard, offset), so re-processing a
  sample after a resume gives the same pixels and crop coordinates. `aesthetic_score` passes
  through from the json (see samples.py).
- Bucket: one buffer per bucket key; once it holds batch_size DISTINCT samples (by shard and
  offset) the first of each leaves as one batch, so a sample does not repeat within a batch; a
  copy of a sample already waiting (a small dataset read again) waits for the next batch. Only
  when a bucket holds 2 x batch_size samples without enough distinct ones (a bucket with fewer
  samples than a batch) does a batch take repeats. A finite stream flushes the partial ones at
  its end in bucket-key order.

Bad input never stops the stream: each bad sample or shard is skipped, and counted by reason
(samples.STREAM_BAD_REASONS) ONCE: only samples of the slot's first epoch (`count_epoch`, the
epoch a fresh stream starts in) are counted, and a shard event (truncated, unreadable) only in
that epoch too. Within one epoch the slots read disjoint samples (shard_list.py), so over all
slots each sample and shard counts once, however many passes a small dataset is read. With
fewer shards than slots every slot reads every shard: its events count in slot shard % slots
only. `seen` counts those first-epoch samples plus one per counted shard event, so bad/seen
is the fraction of distinct samples. `first_pass_done` in the snapshot says the counts are final.
After `heartbeat_every` samples without a batch the stream yields (None, snapshot), so the
main process sees the counts (and can stop an all-bad run) instead of waiting forever; a
finite stream ends with one such item. A slot that reads no sample in a whole epoch raises.

Snapshots. With each batch (or heartbeat) the stream yields a small JSON-able snapshot: the
read cursor, the shuffle RNG state, and the POSITIONS of the samples held in the shuffle and
bucket buffers (not their bytes). A stream built with that snapshot re-reads those samples from
their shards, re-processes them (deterministically), and continues at the cursor, so its output
equals the uninterrupted stream's from there on.

Re-split (resplit.py: resuming on another number of slots). A re-split slot's snapshot also holds
`pending` (buffered positions of the old slots, read first through the shuffle buffer, keeping
their position tags) and `ranges` ([epoch, shard, start, stride, phase]: offsets >= start with
offset % stride == phase, read next); a shard event in a range counts iff its epoch is count_epoch
and shard % stride == phase. Its bucket buffers may start over-full (merged from several old
slots): they emit before anything is read. Then it reads its normal epochs. Both lists shrink as
they are read, so its snapshots resume exactly; snapshots without them load as before.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Hashable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sgm.data.samples import (  # noqa: F401  (IMAGE_EXTENSIONS, BUCKET_BY: re-exported)
    BUCKET_BY,
    IMAGE_EXTENSIONS,
    ImageProcessor,
    Position,
    SampleProcessor,
    Skip,
    StreamBadCounter,
)
from sgm.data.shard_list import iter_shard, shard_sizes, slot_shards

FILTER_REASONS: tuple[str, ...] = ("too_small",)  # counted, but not as defects
SNAPSHOT_VERSION = 1
_SAMPLE_DOMAIN, _SHUFFLE_DOMAIN = 0, 1
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Everything that determines a slot's output; `fingerprint()` guards resumes.

    The image fields (buckets .. max_pixels, default_aesthetic_score) configure the default
    ImageProcessor; with a custom `processor`, give buckets=() and leave them at their defaults.
    """

    shards: tuple[str, ...]
    buckets: tuple[tuple[int, int], ...]
    batch_size: int
    seed: int = 0
    shuffle_buffer: int = 1000
    flip_probability: float = 0.0
    crop: str = "random"
    bucket_by: str = "decoded"
    min_size: int | None = None
    max_pixels: int | None = 178_956_970
    num_epochs: int | None = None
    heartbeat_every: int = 1000
    default_aesthetic_score: float | None = None
    draft_decode: bool = True
    processor: SampleProcessor | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.shards:
            problems.append("shards is empty")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 0:
            problems.append(f"shuffle_buffer must be >= 0 (0 or 1: no shuffling), got {self.shuffle_buffer}")
        if self.num_epochs is not None and self.num_epochs < 1:
            problems.append(f"num_epochs must be None (endless) or >= 1, got {self.num_epochs}")
        if self.heartbeat_every < 1:
            problems.append(f"heartbeat_every must be >= 1, got {self.heartbeat_every}")
        if self.processor is not None and self.buckets:
            problems.append("buckets belong to the image path; with a custom processor give buckets=()")
        if problems:
            raise ValueError("invalid data stream config: " + "; ".join(problems))
        self.sample_processor()  # validates the image fields

    def sample_processor(self) -> SampleProcessor:
        """The processor for this stream: the custom one, or the image path from the fields."""
        return self.processor if self.processor is not None else ImageProcessor.from_config(self)

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able summary compared on resume (the shard list as count, hash, first shard)."""
        # draft_decode is left out: it moves pixels by a few levels, never which samples a batch
        # holds or what they record, so a run may resume across it (and across its introduction).
        fields = {k: v for k, v in asdict(self).items() if k not in ("shards", "processor", "draft_decode")}
        fields["buckets"] = [list(b) for b in self.buckets]
        digest = hashlib.sha256("\n".join(self.shards).encode()).hexdigest()[:16]
        fields["shards"] = {"count": len(self.shards), "hash": digest, "first": self.shards[0]}
        if self.processor is not None:
            fields["processor"] = self.processor.fingerprint()
        return fields


@dataclass
class _Processed:
    position: Position
    bucket: Hashable
    sample: Any


def _key_to_json(key: Hashable) -> Any:
    return list(key) if isinstance(key, tuple) else key


def _key_from_json(value: Any) -> Hashable:
    return tuple(_key_from_json(v) for v in value) if isinstance(value, list) else value


def _distinct(held: list[_Processed]) -> list[int]:
    """Indices of the first copy of each sample (by shard and offset) in `held`, in order."""
    first: dict[tuple[int, int], int] = {}
    for index, processed in enumerate(held):
        first.setdefault(processed.position[1:], index)
    return list(first.values())


class SlotStream:
    """Iterate to get (batch or None, snapshot) pairs for data slot `slot` of `num_slots`."""

    def __init__(
        self, config: StreamConfig, slot: int, num_slots: int, snapshot: dict | None = None, start_epoch: int = 0
    ) -> None:
        """Start fresh at `start_epoch`, or continue exactly where `snapshot` was taken."""
        self.config, self.slot, self.num_slots = config, slot, num_slots
        slot_shards(len(config.shards), config.seed, 0, slot, num_slots)  # validates slot
        self._seed = config.seed % (1 << 64)
        self.epoch, self.shard_k, self.offset, self.epoch_reads = start_epoch, 0, 0, 0
        self.rng = np.random.default_rng([_SHUFFLE_DOMAIN, self._seed, slot])
        self.processor = config.sample_processor()
        self.bad = StreamBadCounter()
        self.seen, self.batches, self.since_batch = 0, 0, 0
        self.count_epoch, self.pass_size = start_epoch, None  # see the module docstring
        self.pass_epoch = start_epoch  # the epoch whose end sets pass_size (a re-split's: its first own)
        self._reading = (start_epoch, slot, num_slots, slot)  # (epoch, shard, stride, phase): see _shard_event
        self.pending: list[Position] = []  # re-split leftover (resplit.py): positions to read first,
        self.ranges: list[list[int]] = []  # then [epoch, shard, start, stride, phase] ranges
        self._balanced = True  # split by samples where sizable; snapshots from before keep the count split
        self.shuffle: list[tuple[Position, dict]] = []
        self.buckets: dict[Hashable, list[_Processed]] = {}
        self._snapshot = snapshot
        self._started = False
        if snapshot is not None:
            self._load_scalars(snapshot)

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        if self._started:
            raise RuntimeError("a SlotStream can be iterated only once; build a new one from a snapshot")
        self._started = True
        if self._snapshot is not None:
            self._restore_buffers(self._snapshot)
        for bucket in sorted(self.buckets):  # only a re-split (resplit.py) merges buckets this full
            while self._full(bucket):
                yield self._emit(bucket), self.snapshot()
        for position, raw in self._raw_samples():
            if self.config.shuffle_buffer <= 1:
                yield from self._consume(position, raw)
            elif len(self.shuffle) < min(self.config.shuffle_buffer, self.pass_size or self.config.shuffle_buffer):
                self.shuffle.append((position, raw))
            else:
                index = int(self.rng.integers(len(self.shuffle)))
                leaving, self.shuffle[index] = self.shuffle[index], (position, raw)
                yield from self._consume(*leaving)
        while self.shuffle:  # only a finite stream (num_epochs) gets here
            yield from self._consume(*self.shuffle.pop(int(self.rng.integers(len(self.shuffle)))))
        for bucket in sorted(self.buckets):
            while self.buckets.get(bucket):
                yield self._emit(bucket), self.snapshot()
        yield None, self.snapshot()  # the final counts, including samples after the last batch

    # -- reading -------------------------------------------------------------------------------
    def _raw_samples(self) -> Iterator[tuple[Position, dict]]:
        yield from self._leftover_samples()
        config, num_shards = self.config, len(self.config.shards)
        sizes = shard_sizes(config.shards) if self._balanced else None
        while config.num_epochs is None or self.epoch < config.num_epochs:
            shard_ids, stride = slot_shards(num_shards, config.seed, self.epoch, self.slot, self.num_slots, sizes)
            while self.shard_k < len(shard_ids):
                shard_id, skip = shard_ids[self.shard_k], self.offset
                self._reading = (self.epoch, shard_id, self.num_slots, self.slot) if stride else (self.epoch, 0, 1, 0)
                for offset, raw in enumerate(iter_shard(config.shards[shard_id], self._shard_event)):
                    if offset < skip:
                        continue
                    self.offset = offset + 1  # the cursor points past the sample while it is out
                    if stride and offset % self.num_slots != self.slot:
                        continue
                    self.epoch_reads += 1
                    yield (self.epoch, shard_id, offset), raw
                self.shard_k, self.offset = self.shard_k + 1, 0
            if self.epoch_reads == 0 and config.num_epochs is None:
                raise RuntimeError(
                    f"data slot {self.slot} of {self.num_slots} read no sample in epoch {self.epoch} "
                    f"(bad counts so far: {self.bad.as_dict()}). Check that the shards are readable "
                    "tars, or give more samples/shards than world_size * num_workers data slots."
                )
            if self.epoch == self.pass_epoch:  # count_epoch, or after a re-split its first own epoch
                self.pass_size = max(self.epoch_reads, 1)
            self.epoch, self.shard_k, self.offset, self.epoch_reads = self.epoch + 1, 0, 0, 0

    def _leftover_samples(self) -> Iterator[tuple[Position, dict]]:
        """A re-split's leftover (resplit.py): the pending positions (sorted by shard), then the ranges;
        each popped once read, the first range's start kept as the cursor, so snapshots resume exactly."""
        shards = self.config.shards
        while self.pending:
            shard_id = self.pending[0][1]
            for offset, raw in enumerate(iter_shard(shards[shard_id], lambda *_: None)):
                if not self.pending or self.pending[0][1] != shard_id:
                    break
                while self.pending and self.pending[0][1] == shard_id and self.pending[0][2] == offset:
                    yield self.pending.pop(0), raw  # the same sample may wait with two epoch tags
            if self.pending and self.pending[0][1] == shard_id:
                raise RuntimeError(
                    f"cannot resume: buffered sample {self.pending[0]} is gone from {shards[shard_id]}. The "
                    "shards changed since the checkpoint; restore them or start without data state."
                )
        while self.ranges:
            epoch, shard_id, start, stride, phase = self.ranges[0]
            self._reading = (epoch, shard_id, stride, phase)
            for offset, raw in enumerate(iter_shard(shards[shard_id], self._shard_event)):
                if offset < start:
                    continue
                self.ranges[0][2] = offset + 1  # the cursor points past the sample while it is out
                if offset % stride == phase:
                    yield (epoch, shard_id, offset), raw
            self.ranges.pop(0)

    def _shard_event(self, reason: str, detail: str) -> None:
        self.since_batch += 1
        epoch, shard_id, stride, phase = self._reading
        if epoch != self.count_epoch or shard_id % stride != phase:
            return  # counted once: in the first epoch, by one slot (see the module docstring)
        _log.warning("data slot %d skips the rest of a shard (%s): %s", self.slot, reason, detail)
        self.bad.add(reason)
        self.seen += 1

    # -- decoding and batching -----------------------------------------------------------------
    def _consume(self, position: Position, raw: dict) -> Iterator[tuple[dict | None, dict]]:
        counted = position[0] == self.count_epoch  # each sample counts once: in the first epoch
        self.seen += counted
        self.since_batch += 1
        try:
            sample = self._process(position, raw)
        except Skip as skip:
            if counted:
                self.bad.add(skip.reason)
        else:
            self.buckets.setdefault(sample.bucket, []).append(sample)
            if self._full(sample.bucket):
                yield self._emit(sample.bucket), self.snapshot()
                return
        if self.since_batch >= self.config.heartbeat_every:
            self.since_batch = 0
            yield None, self.snapshot()

    def _process(self, position: Position, raw: dict) -> _Processed:
        """Run the processor with an RNG seeded by the sample's position; raises Skip(reason)."""
        rng = None
        if self.processor.needs_rng:
            epoch, shard_id, offset = position
            rng = np.random.default_rng([_SAMPLE_DOMAIN, self._seed, epoch, shard_id, offset])
        bucket, sample = self.processor.process(raw, position, rng)
        return _Processed(position, bucket, sample)

    def _full(self, bucket: Hashable) -> bool:
        """Whether the bucket holds a batch: batch_size distinct samples, or 2 x batch_size in all."""
        held, size = self.buckets.get(bucket, []), self.config.batch_size
        return bool(held) and (len(held) >= 2 * size or len(_distinct(held)) >= size)

    def _emit(self, bucket: Hashable) -> dict[str, Any]:
        """One batch of the bucket: the first of each distinct sample (up to batch_size), topped up
        with repeats only when there are too few; the rest keep their order for the next batch."""
        held, size = self.buckets.pop(bucket), self.config.batch_size
        chosen = _distinct(held)[:size]
        if len(chosen) < size and len(held) >= 2 * size:  # too few distinct samples in this bucket
            chosen += [i for i in range(len(held)) if i not in chosen][: size - len(chosen)]
        picked = set(chosen)
        rest = [p for i, p in enumerate(held) if i not in picked]
        if rest:
            self.buckets[bucket] = rest
        self.batches += 1
        self.since_batch = 0
        return self.processor.collate([held[i].sample for i in sorted(picked)])

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The state after the last yielded item, as plain JSON-able data."""
        snap = {
            "version": SNAPSHOT_VERSION,
            "slot": self.slot,
            "num_slots": self.num_slots,
            "epoch": self.epoch,
            "cursor": [self.shard_k, self.offset],
            "balanced": self._balanced,
            "epoch_reads": self.epoch_reads,
            "shuffle_rng": self.rng.bit_generator.state,
            "shuffle": [list(position) for position, _ in self.shuffle],
            "buckets": [[_key_to_json(b), [list(p.position) for p in self.buckets[b]]] for b in sorted(self.buckets)],
            "bad": self.bad.as_dict(),
            "seen": self.seen,
            "batches": self.batches,
            "since_batch": self.since_batch,
            "count_epoch": self.count_epoch,
            "pass_size": self.pass_size,
            "first_pass_done": self.pass_size is not None
            and all(position[0] != self.count_epoch for position, _ in self.shuffle)
            and all(p[0] != self.count_epoch for p in self.pending)
            and all(r[0] != self.count_epoch for r in self.ranges),
        }
        if self.pass_epoch != self.count_epoch:
            snap["pass_epoch"] = self.pass_epoch
        if self.pending:  # a re-split's leftover not read yet (absent otherwise: the format stays as it was)
            snap["pending"] = [list(p) for p in self.pending]
        if self.ranges:
            snap["ranges"] = [list(r) for r in self.ranges]
        return snap

    def _load_scalars(self, snap: dict) -> None:
        found = (snap.get("version"), snap.get("slot"), snap.get("num_slots"))
        if found != (SNAPSHOT_VERSION, self.slot, self.num_slots):
            raise ValueError(
                f"data snapshot (version, slot, num_slots) = {found} does not fit this stream's "
                f"{(SNAPSHOT_VERSION, self.slot, self.num_slots)}; restore it into the slot that saved it"
            )
        self.epoch, (self.shard_k, self.offset) = snap["epoch"], snap["cursor"]
        self.epoch_reads, self.rng.bit_generator.state = snap["epoch_reads"], snap["shuffle_rng"]
        self.bad = StreamBadCounter(snap["bad"])
        self.seen, self.batches, self.since_batch = snap["seen"], snap["batches"], snap["since_batch"]
        self.count_epoch, self.pass_size = snap.get("count_epoch", 0), snap.get("pass_size")
        self.pass_epoch = snap.get("pass_epoch", self.count_epoch)
        self._balanced = snap.get("balanced", False)  # the cursor indexes the split it was taken in
        self.pending = [tuple(p) for p in snap.get("pending", [])]
        self.ranges = [list(r) for r in snap.get("ranges", [])]

    def _restore_buffers(self, snap: dict) -> None:
        """Re-read the buffered samples by position and re-process those that sat in buckets."""
        positions: list[Position] = [tuple(p) for p in snap["shuffle"]]
        for _, held in snap["buckets"]:
            positions.extend(tuple(p) for p in held)
        raws = self._fetch(positions)
        self.shuffle = [(tuple(p), raws[tuple(p)]) for p in snap["shuffle"]]
        for saved_key, held in snap["buckets"]:
            bucket = _key_from_json(saved_key)
            for p in held:
                try:
                    sample = self._process(tuple(p), raws[tuple(p)])
                except Skip as skip:
                    raise RuntimeError(f"sample at {p} is now bad ({skip.reason}); the shards changed") from None
                if sample.bucket != bucket:
                    raise RuntimeError(f"sample at {p} now falls in another bucket; the shards changed")
                self.buckets.setdefault(bucket, []).append(sample)

    def _fetch(self, positions: list[Position]) -> dict[Position, dict]:
        wanted: dict[int, set[int]] = defaultdict(set)
        for _, shard_id, offset in positions:
            wanted[shard_id].add(offset)
        found: dict[tuple[int, int], dict] = {}
        for shard_id, offsets in wanted.items():
            last = max(offsets)
            for offset, raw in enumerate(iter_shard(self.config.shards[shard_id], lambda *_: None)):
                if offset in offsets:
                    found[shard_id, offset] = raw
                if offset >= last:
                    break
        missing = [p for p in positions if (p[1], p[2]) not in found]
        if missing:
            shard = self.config.shards[missing[0][1]]
            raise RuntimeError(
                f"cannot resume: {len(missing)} buffered sample(s) are gone, e.g. offset {missing[0][2]} of "
                f"{shard}. The shards changed since the checkpoint; restore them or start without data state."
            )
        return {p: found[p[1], p[2]] for p in positions}

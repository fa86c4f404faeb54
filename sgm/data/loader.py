"""The training loader: bucketed webdataset batches, equal batch counts on every rank, exact resume.

`BucketedLoader` wraps a torch DataLoader over per-slot streams (stream.py); each DataLoader
worker of each rank is one data slot (shard_list.py). It is free of Lightning: Lightning (or any
loop) just iterates it and may call `state_dict()` / `load_state_dict()`.

Equal batch counts across ranks (decided, not accidental):
- Every slot's stream is endless (epochs repeat, re-permuted), so every rank yields a batch at
  every step and no rank waits at an epoch end for a collective the others never reach.
  Training is step-based; `batches_per_epoch` (optional) cuts the one persistent stream into
  equal "epochs" for Lightning, continuing the same stream, never restarting it.
- Ranks do NOT agree on buckets step by step: each rank's batch is homogeneous in size, but rank
  0 may train a 1024x1024 batch while rank 1 trains 768x1344. Step times stay balanced because
  the SDXL bucket table is area-balanced: at 1024 every bucket holds 0.90..1.00 x 1024^2 pixels,
  at 512 and 256 0.94..1.13 x base^2 (tests/test_data_loader.py asserts these bounds), so the
  slowest rank does at most ~10-20% more work per step. The alternative, a per-step agreement on
  one bucket across ranks, needs a collective in the data path and starves rare buckets.

Resume: with an in-order DataLoader, item i comes from worker i % W. Each item carries its
slot's snapshot; the loader keeps the latest per slot and the item count n. A new loader given
that state makes its worker w continue old worker (w + n) % W's slot from its snapshot, so the
interleaving, the batches and their pixels continue exactly. The state holds this rank's slots
only; `merge_loader_states` unions the states of all ranks for one checkpoint. A state saved with
another shard list, seed, batch size, bucket table, world size or worker count is refused with
the differences listed, unless on_mismatch="restart_epoch": then every slot restarts (fresh
buffers) at the earliest epoch any saved slot was in; samples of that epoch may be seen twice.

Re-split (on_mismatch="resplit"; the refusal names `reshard_key`, e.g. resume_reshard=true): a
state saved by another number of readers (world_size and/or num_workers, nothing else changed)
is re-split over this run's readers (resplit.py). Every rank is given the same merged state of
ALL old ranks, computes the same re-split and takes its own slots; `resplit_report` says what was
done. Guarantee, with E the earliest epoch any old reader was still reading (the pass in
progress): every sample of pass E that was not trained before the checkpoint is trained exactly
once after the resume; no sample of pass E trained before the checkpoint is trained again in pass
E; the only repeats are the `resplit_report["repeats"]` samples that readers running ahead had
already taken from pass E + 1 (pass E + 1, read under the new split, has them again). The
shuffle buffer mixes the end of pass E with the start of pass E + 1 around the resume, as at
any epoch boundary. Bad-input totals (bad and seen by reason) carry over unchanged.

What a batch holds comes from the stream's processor: `BucketedLoader` decodes images
(samples.ImageProcessor); `SlotLoader` takes any StreamConfig, e.g. latent_loader.LatentLoader.

Bad input: each bad sample or shard counts once, however often a small dataset is re-read
(stream.py: only the first epoch counts). Counts by reason are summed over this rank's slots
(`bad_counts()`, for logging) and checked against `max_bad_fraction` once `min_seen_for_check`
distinct samples (default 1,000) were seen, or earlier, once every slot of this rank has counted
its whole first epoch (a dataset smaller than that minimum). Before that, from 100 distinct
samples, a gross excess (more than 5 x max_bad_fraction) stops too: 25% bad data stops within
100 samples, while data just under the limit is not stopped by the noise of a small count (at
1%, 2 bad of the first 100 are common; 6 are not). Past the limit the loader raises
`TooManyBadSamples` in the main process (training catches it, saves a checkpoint and exits 2).
The filter reasons (too_small) do not count as bad. Workers send uint8 pixels; normalise in the step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sgm.data.buckets import Bucket, bucket_table, square_table
from sgm.data.resplit import LAYOUT_KEYS, layout_fingerprint, reading_epoch, resplit_state
from sgm.data.samples import ImageProcessor, StreamBadCounter
from sgm.data.shard_list import expand_shards, num_slots_for
from sgm.data.stream import FILTER_REASONS, SlotStream, StreamConfig

STATE_VERSION = 1
ON_MISMATCH = ("error", "restart_epoch", "resplit")
MIN_SEEN_FOR_CHECK = 1000  # distinct samples before max_bad_fraction itself is judged (or one whole pass)
EARLY_CHECK_SEEN, EARLY_CHECK_FACTOR = 100, 5  # from 100 samples, stop on more than 5 x max_bad_fraction


class TooManyBadSamples(RuntimeError):
    """More than max_bad_fraction of the distinct samples were bad; the message names the counts by
    reason, the setting and the fix. `checkpoint` is set by whoever saved what was trained."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.checkpoint: str | None = None

    def __str__(self) -> str:
        saved = f" What was trained so far is saved in {self.checkpoint}." if self.checkpoint else ""
        return super().__str__() + saved


class ReaderLayoutChanged(ValueError):
    """A saved data position belongs to another number of readers (world_size x num_workers): resume with
    on_mismatch="resplit" (the message names the setting that asks for it), or on the saved layout."""


def layout_change(saved: tuple[Any, Any], current: tuple[Any, Any], reshard_key: str = "resume_reshard=true") -> str:
    """What a resume on another reader layout says: both layouts (world_size, num_workers), and the setting
    that re-splits the position."""
    return (
        f"the data position was saved by world_size={saved[0]} x num_workers={saved[1]} readers, this run has "
        f"{current[0]} x {current[1]}: set {reshard_key} to re-split it over this run's readers (the unfinished "
        "pass is trained once, without skips; samples that readers running ahead took from the next pass are "
        "counted and seen again), or resume with the saved number of processes (trainer.devices x "
        "trainer.num_nodes) and data.num_workers"
    )


def _keep(item: Any) -> Any:
    """DataLoader convert hook that leaves (batch, snapshot) as the worker made it."""
    return item


class _SlotDataset(IterableDataset):
    """Worker w of rank r runs slot r * W + (w + first_item) % W, continuing its snapshot."""

    def __init__(
        self,
        config: StreamConfig,
        rank: int,
        world_size: int,
        num_workers: int,
        first_item: int,
        snapshots: dict[str, dict],
        start_epoch: int,
    ) -> None:
        super().__init__()
        self.config, self.rank, self.world_size, self.num_workers = config, rank, world_size, num_workers
        self.first_item, self.snapshots, self.start_epoch = first_item, snapshots, start_epoch

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        workers, running = max(self.num_workers, 1), (info.num_workers if info else 1)
        if running != workers:
            raise RuntimeError(f"built for {workers} DataLoader worker(s), running in {running}")
        slot = self.rank * workers + ((info.id if info else 0) + self.first_item) % workers
        num_slots = num_slots_for(self.world_size, self.num_workers)
        yield from SlotStream(self.config, slot, num_slots, self.snapshots.get(str(slot)), self.start_epoch)


class SlotLoader:
    """Iterate for the batches of a StreamConfig's processor, one bucket per batch, split over
    ranks and workers into data slots (see the module docstring for resume and batch counts)."""

    def __init__(
        self,
        config: StreamConfig,
        *,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        batches_per_epoch: int | None = None,
        max_bad_fraction: float = 0.01,
        min_seen_for_check: int = MIN_SEEN_FOR_CHECK,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
        config_key: str = "data.max_bad_fraction",
        reshard_key: str = "resume_reshard=true",
    ) -> None:
        """rank/world_size default to torch.distributed's, else 0/1. `config_key` and `reshard_key`
        are what the errors tell the user to set (the bad-fraction limit; the re-split on resume)."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        if world_size is None:
            world_size = torch.distributed.get_world_size() if dist else 1
        self.world_size = world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be None (endless) or >= 1, got {batches_per_epoch}")
        if min_seen_for_check < 0:
            raise ValueError(f"min_seen_for_check must be >= 0, got {min_seen_for_check}")
        StreamBadCounter().check(max_bad_fraction, 0, config_key)  # validates the fraction
        self.num_workers, self.num_slots = num_workers, num_slots_for(self.world_size, num_workers)
        self.config = config
        self.batches_per_epoch, self.max_bad_fraction = batches_per_epoch, max_bad_fraction
        self.min_seen_for_check, self.config_key = min_seen_for_check, config_key
        self.reshard_key = reshard_key
        self.resplit_report: dict[str, Any] | None = None  # set by load_state_dict(on_mismatch="resplit")
        self._loader_kwargs: dict[str, Any] = {"pin_memory": pin_memory}
        if num_workers > 0:  # the context: None is torch's default (fork on Linux, unless set)
            self._loader_kwargs["prefetch_factor"] = prefetch_factor
            self._loader_kwargs["multiprocessing_context"] = multiprocessing_context
        self._items = self._batches = 0
        self._start_item, self._start_epoch = 0, 0
        self._snapshots: dict[str, dict] = {}
        self._iterator: Iterator | None = None
        self._exhausted = False

    # -- iteration -----------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("this loader is endless; set batches_per_epoch to give it a length")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The next batches_per_epoch batches (endless when None) of the one persistent stream.

        A finite loader (num_epochs) that has ended starts over from scratch (e.g. validation)."""
        if self._exhausted:
            self._items = self._batches = self._start_item = 0
            self._snapshots, self._iterator, self._exhausted = {}, None, False
        count = 0
        while self.batches_per_epoch is None or count < self.batches_per_epoch:
            batch = self._next_batch()
            if batch is None:
                return
            count += 1
            yield batch

    def _next_batch(self) -> dict[str, Any] | None:
        while not self._exhausted:
            if self._iterator is None:
                self._iterator = iter(self._dataloader())
            try:
                batch, snapshot = next(self._iterator)
            except StopIteration:  # only finite streams (num_epochs) end
                self._exhausted = True
                return None
            self._items += 1
            self._snapshots[str(snapshot["slot"])] = snapshot
            self._check_bad()
            if batch is not None:
                self._batches += 1
                return batch
        return None

    def _dataloader(self) -> DataLoader:
        dataset = _SlotDataset(
            self.config,
            self.rank,
            self.world_size,
            self.num_workers,
            self._start_item,
            dict(self._snapshots),
            self._start_epoch,
        )
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_keep, **self._loader_kwargs
        )

    def close(self) -> None:
        """Stop the workers; the next iteration restarts them from the recorded state."""
        self._iterator = None
        self._start_item = self._items

    # -- bad input -----------------------------------------------------------------------------
    def bad_counts(self) -> dict[str, int]:
        """Bad and filtered samples by reason, summed over this rank's slots (for logging)."""
        total = StreamBadCounter()
        for snapshot in self._snapshots.values():
            total.merge(snapshot["bad"])
        return total.as_dict()

    def samples_seen(self) -> int:
        """Distinct samples counted (plus one per shard-level failure) over this rank's slots."""
        return sum(snapshot["seen"] for snapshot in self._snapshots.values())

    def _check_bad(self) -> None:
        seen = self.samples_seen()
        whole_pass = len(self._snapshots) == max(self.num_workers, 1) and all(
            snapshot.get("first_pass_done") for snapshot in self._snapshots.values()
        )
        final = seen >= max(self.min_seen_for_check, 1) or (whole_pass and seen > 0)
        if not final and seen < EARLY_CHECK_SEEN:
            return
        limit = self.max_bad_fraction if final else EARLY_CHECK_FACTOR * self.max_bad_fraction
        defects = StreamBadCounter({r: c for r, c in self.bad_counts().items() if r not in FILTER_REASONS})
        if defects.total <= limit * seen:
            return
        counts = ", ".join(f"{reason}={count}" for reason, count in defects.as_dict().items())
        key = self.config_key
        early = "" if final else f" (judged early: over {EARLY_CHECK_FACTOR} x that in the first {seen})"
        raise TooManyBadSamples(
            f"{defects.total} of {seen} samples ({defects.total / seen:.1%}) could not be used ({counts}), "
            f"more than {key}={self.max_bad_fraction}{early}. Check or rebuild the shards, "
            f"or raise {key} to accept this many bad samples."
        )

    # -- state ---------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must match for an exact resume."""
        return layout_fingerprint(self.config, self.world_size, self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: per rank, items and batches yielded and the latest snapshot per slot."""
        mine = {"items": self._items, "batches": self._batches, "snapshots": dict(sorted(self._snapshots.items()))}
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint(), "ranks": {str(self.rank): mine}}

    def load_state_dict(self, state: dict[str, Any], on_mismatch: str = "error") -> None:
        """Continue exactly where `state` (from state_dict or merge_loader_states) stopped.

        on_mismatch (when the saved settings differ): "error" raises, listing the differences;
        "restart_epoch" restarts every slot at the earliest saved epoch with fresh buffers;
        "resplit" re-splits a state whose only differences are world_size and/or num_workers over
        this run's readers (module docstring; `state` must hold every old rank), and keeps the
        report in `self.resplit_report`. Other differences raise with "resplit" too."""
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        saved = state["fingerprint"]
        differences = _differences(saved, self.fingerprint())
        layout_only = (
            bool(differences)
            and all(saved.get(k) == v for k, v in self.fingerprint().items() if k not in LAYOUT_KEYS)
            and set(saved) == set(self.fingerprint())
        )
        self.resplit_report = None
        if layout_only and on_mismatch == "resplit":
            state, self.resplit_report = resplit_state(state, self.config, self.world_size, self.num_workers)
            differences = []
        mine = state["ranks"].get(str(self.rank))
        if not differences and mine is None:
            saved_ranks = sorted(int(r) for r in state["ranks"])
            differences = [f"the state holds ranks {saved_ranks} only, not rank {self.rank}"]
        if differences and layout_only and on_mismatch == "error":
            saved_layout = (saved.get("world_size"), saved.get("num_workers"))
            raise ReaderLayoutChanged(
                "cannot resume the data loader exactly: "
                + "; ".join(differences)
                + ". "
                + layout_change(saved_layout, (self.world_size, self.num_workers), self.reshard_key)
                + " (or pass on_mismatch='restart_epoch' to restart the earliest saved epoch with fresh buffers)"
            )
        if differences and on_mismatch in ("error", "resplit"):
            raise ValueError(
                "cannot resume the data loader exactly: " + "; ".join(differences) + ". Resume with the saved "
                "settings (and every rank's state, merged with merge_loader_states), or pass "
                "on_mismatch='restart_epoch' to restart the earliest saved epoch with fresh buffers."
            )
        self.close()
        self._exhausted = False
        if differences:  # restart_epoch: fresh buffers, every slot at the earliest saved epoch
            epochs = [reading_epoch(snap) for rank in state["ranks"].values() for snap in rank["snapshots"].values()]
            self._items = self._batches = self._start_item = 0
            self._snapshots, self._start_epoch = {}, min(epochs, default=0)
            return
        self._items, self._batches, self._start_item = mine["items"], mine["batches"], mine["items"]
        self._snapshots, self._start_epoch = dict(mine["snapshots"]), 0


class BucketedLoader(SlotLoader):
    """Iterate for batches {"jpg" uint8 [B,3,H,W], "txt", "original_size_as_tuple",
    "crop_coords_top_left", "target_size_as_tuple", "__key__"} (plus "aesthetic_score" float [B],
    see samples.py), one bucket per batch."""

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        batch_size: int,
        base_resolution: int | None = None,
        square_size: int | None = None,
        buckets: Sequence[Bucket] | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        flip_probability: float = 0.0,
        crop: str = "random",
        bucket_by: str = "decoded",
        min_size: int | None = None,
        max_pixels: int | None = 178_956_970,
        num_epochs: int | None = None,
        heartbeat_every: int = 1000,
        default_aesthetic_score: float | None = None,
        draft_decode: bool = True,
        bucket_no_upscale: bool = False,
        **loader_options: Any,
    ) -> None:
        """Give exactly one of base_resolution (SDXL multi-aspect table), square_size (one square
        bucket) or buckets. `bucket_no_upscale`: images smaller than their bucket go to a smaller
        bucket of the same aspect instead of being upscaled (samples.ImageProcessor). `loader_options`
        are SlotLoader's (num_workers, rank, world_size, batches_per_epoch, max_bad_fraction, ...)."""
        if sum(x is not None for x in (base_resolution, square_size, buckets)) != 1:
            raise ValueError(
                "give exactly one of data.base_resolution (multi-aspect buckets), data.square_size "
                f"(fixed-size stage) or data.buckets; got {base_resolution=}, {square_size=}, {buckets=}"
            )
        if base_resolution is not None:
            table = bucket_table(base_resolution)
        else:
            table = square_table(square_size) if square_size is not None else list(buckets or [])
        image = {
            "buckets": tuple(tuple(int(s) for s in b) for b in table),
            "flip_probability": flip_probability,
            "crop": crop,
            "bucket_by": bucket_by,
            "min_size": min_size,
            "max_pixels": max_pixels,
            "default_aesthetic_score": default_aesthetic_score,
            "draft_decode": draft_decode,
        }
        if bucket_no_upscale:  # the processor holds the image settings (and fingerprints them)
            image = {"buckets": (), "processor": ImageProcessor(**image, bucket_no_upscale=True)}
        config = StreamConfig(
            shards=tuple(expand_shards(shards)),
            batch_size=batch_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            num_epochs=num_epochs,
            heartbeat_every=heartbeat_every,
            **image,
        )
        super().__init__(config, **loader_options)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{key} was {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def merge_loader_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state for the whole job from every rank's state_dict (e.g. via all_gather_object)."""
    if not states:
        raise ValueError("no loader states to merge")
    if any(state["fingerprint"] != states[0]["fingerprint"] for state in states):
        raise ValueError("loader states were saved with different settings; merge states of one run")
    ranks: dict[str, Any] = {}
    for state in states:
        ranks.update(state["ranks"])
    return {**states[0], "ranks": dict(sorted(ranks.items(), key=lambda kv: int(kv[0])))}

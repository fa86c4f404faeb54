"""Re-split a saved data position over a different number of readers (world_size x num_workers).

A run checkpointed on N ranks (or W workers per rank) may resume on M ranks / W' workers
(SlotLoader.load_state_dict(state, on_mismatch="resplit")). `resplit_state` turns the merged
state of ALL old ranks into a merged state for the new layout, deterministically, so every new
rank computes the same result from the same state and takes its own slots.

Algorithm. E = the earliest epoch any old slot is still reading (its epoch cursor, or the epoch of
a leftover range it has not finished; a slot without a snapshot never yielded and is at the start
of its first epoch). Pass E is the pass in progress. Its leftover work is
- every buffered position (shuffle and bucket buffers, and leftover positions not yet read) of
  every old slot whose epoch tag is <= E: read but not trained. They keep their (epoch, shard,
  offset) tag, so the per-sample RNG gives identical pixels and crops;
- for old slots still reading epoch E, the unread rest of their epoch-E shard list
  (shard_list.slot_shards exactly as the stream dealt it: the snapshot's `balanced` flag, and the
  stride mode of fewer shards than slots, where old slot s keeps offsets with offset % S == s),
  as ranges [epoch, shard_id, start_offset, stride, phase] (a range reads the offsets >= start
  with offset % stride == phase; stride 1, phase 0 for whole shards), plus the unfinished
  leftover ranges of an earlier re-split.
Buffered positions with an epoch tag > E are dropped: they come again in the new pass E + 1.

Dealing. Buffered shuffle positions (sorted by shard, offset, epoch) go in contiguous, equal
chunks to the new slots (each slot then re-reads few shards); bucket positions round-robin per
bucket, into the new slots' bucket buffers (they were already counted, and are not counted
again). Ranges go whole, largest first (by samples, with shard_list.shard_sizes when it sizes the
shards, else each range counts 1), each to the new slot with the least work so far (ties: fewer
ranges, lower slot), and keep their global order within a slot. A new slot's snapshot carries
`pending` (positions read first, through its shuffle buffer) and `ranges` (read next); then it
reads normal epochs from E + 1 under the new split, with a fresh shuffle RNG seeded by
(seed, slot, E + 1). Its snapshots record what of `pending` and `ranges` is left (the first range's
start is the cursor), so a kill during the drain resumes exactly (a same-layout resume).

Bad-input accounting (stream.py: each sample and shard counted once, in count_epoch): old slot s's
`bad`, `seen` and `batches` go to new slot s % new_num_slots, so the sums over all slots are kept;
count_epoch is kept (the earliest old one). Leftover samples tagged count_epoch are counted when
consumed, as usual (bucket positions were counted already and are not consumed again). A shard
event (truncated, unreadable) met while reading a leftover range counts iff the range's epoch is
count_epoch and shard_id % stride == phase: the rule the old slot applied, so across the old
slots' ranges of one shard (stride mode) it counts once, and never if the old slot that owned it
had already passed the shard. pass_size: ceil(sum / new_num_slots) if every old slot had one,
else None (then the end of epoch E + 1 sets it, as the end of count_epoch does normally:
`pass_epoch` in the snapshot).

Guarantee (the report's numbers make it checkable): every sample of pass E that was not trained
before the checkpoint (still buffered, or not yet read) is trained exactly once after the resume;
no sample of pass E trained before the checkpoint is trained again in pass E; the only repeats are
the `repeats` samples that old readers running ahead (epoch > E) had already taken from pass
E + 1 (or later) out of their shuffle buffers: pass E + 1 under the new split reads them again.
"Trained" is "left the shuffle buffer": a bad one is skipped (and counted once) instead. The
shuffle buffer mixes the end of pass E with the start of pass E + 1 around the resume, as it does
at every epoch boundary. With fewer old readers ahead than shards, `repeats` is exact for readable
shards (a whole extra epoch ahead is sized from the tar headers, or from pass_size for pipe:/URL
shards, then `repeats_exact` is False).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from typing import Any

import numpy as np

from sgm.data.shard_list import num_slots_for, shard_sizes, slot_shards
from sgm.data.stream import _SHUFFLE_DOMAIN, SNAPSHOT_VERSION, StreamConfig

LAYOUT_KEYS = ("world_size", "num_workers")
_RESPLIT_DOMAIN = 3  # the fresh shuffle RNG of a re-split slot (stream.py uses 0, 1; shard_list 2)


def layout_fingerprint(config: StreamConfig, world_size: int, num_workers: int) -> dict[str, Any]:
    """SlotLoader.fingerprint for this config and layout."""
    return {**config.fingerprint(), "world_size": world_size, "num_workers": num_workers}


def reading_epoch(snapshot: dict) -> int:
    """The earliest epoch the slot still reads: its cursor's, or an unfinished leftover range's."""
    return min([snapshot["epoch"]] + [r[0] for r in snapshot.get("ranges", [])])


def resplit_state(
    state: dict[str, Any], config: StreamConfig, world_size: int, num_workers: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(merged loader state for world_size x num_workers readers, report) from the merged state of
    every old rank. Report: epoch (E), old_slots, new_slots, leftover_samples (buffered positions
    + samples in leftover ranges; ranges of unsizable shards count 1 each), leftover_positions,
    leftover_ranges, dropped (buffered positions of passes > E), repeats, repeats_exact."""
    saved = state["fingerprint"]
    current = layout_fingerprint(config, world_size, num_workers)
    other = sorted(k for k in set(saved) | set(current) if k not in LAYOUT_KEYS and saved.get(k) != current.get(k))
    if other:
        raise ValueError(f"cannot re-split a data state saved with other settings: {', '.join(other)} differ")
    old_world, old_workers = saved["world_size"], saved["num_workers"]
    old_num = num_slots_for(old_world, old_workers)
    new_num = num_slots_for(world_size, num_workers)
    ranks = sorted(int(r) for r in state["ranks"])
    if ranks != list(range(old_world)):
        raise ValueError(
            f"a re-split needs every old rank's state (merge_loader_states over all {old_world}); "
            f"this state holds ranks {ranks}"
        )
    snaps: dict[int, dict] = {}
    for rank_state in state["ranks"].values():
        for slot, snap in rank_state["snapshots"].items():
            snaps[int(slot)] = snap
    count_epoch = min((s.get("count_epoch", 0) for s in snaps.values()), default=0)
    epochs = {slot: reading_epoch(snaps[slot]) if slot in snaps else count_epoch for slot in range(old_num)}
    epoch = min(epochs.values())
    num_shards, seed = len(config.shards), config.seed
    sizes = shard_sizes(config.shards)

    def slot_list(slot: int, at: int, balanced: bool) -> tuple[list[int], bool]:
        return slot_shards(num_shards, seed, at, slot, old_num, sizes if balanced else None)

    def range_size(r: list[int]) -> int:
        _, shard, start, stride, phase = r
        if sizes is None:
            return 1
        first = start + (phase - start) % stride  # the first offset >= start with offset % stride == phase
        return max(0, -(-(sizes[shard] - first) // stride))

    shuffle_positions: list[list[int]] = []
    bucket_positions: dict[str, tuple[Any, list[list[int]]]] = {}
    ranges: list[list[int]] = []
    dropped = repeats = 0
    repeats_exact = True
    for slot in range(old_num):
        snap = snaps.get(slot)
        if snap is None:  # never yielded: at the start of its first epoch (= E)
            ids, stride = slot_list(slot, epoch, True)
            ranges += [[epoch, s, 0, old_num if stride else 1, slot if stride else 0] for s in ids]
            continue
        for p in snap["shuffle"] + snap.get("pending", []):
            if p[0] <= epoch:
                shuffle_positions.append(list(p))
            else:
                dropped += 1
        for key, held in snap["buckets"]:
            kept = [list(p) for p in held if p[0] <= epoch]
            dropped += len(held) - len(kept)
            bucket_positions.setdefault(repr(key), (key, []))[1].extend(kept)
        ranges += [list(r) for r in snap.get("ranges", []) if r[0] <= epoch]
        balanced = snap.get("balanced", False)
        if snap["epoch"] == epoch:
            ids, stride = slot_list(slot, epoch, balanced)
            k, offset = snap["cursor"]
            stride_phase = [old_num, slot] if stride else [1, 0]
            ranges += [[epoch, s, offset if j == k else 0, *stride_phase] for j, s in enumerate(ids) if j >= k]
        elif snap["epoch"] > epoch:  # ran ahead: what it read beyond pass E, less what still waits
            ahead = snap.get("epoch_reads", 0)
            for between in range(epoch + 1, snap["epoch"]):
                ids, stride = slot_list(slot, between, balanced)
                if sizes is None:
                    ahead += snap.get("pass_size") or 0
                    repeats_exact = False
                else:
                    ahead += sum(
                        range_size([between, s, 0, old_num if stride else 1, slot if stride else 0]) for s in ids
                    )
            waiting = [p for p in snap["shuffle"] + snap.get("pending", []) if p[0] > epoch]
            waiting += [p for _, held in snap["buckets"] for p in held if p[0] > epoch]
            repeats += max(0, ahead - len(waiting))

    # -- deal -------------------------------------------------------------------------------------
    shuffle_positions.sort(key=lambda p: (p[1], p[2], p[0]))
    pending: list[list[list[int]]] = [
        shuffle_positions[j * len(shuffle_positions) // new_num : (j + 1) * len(shuffle_positions) // new_num]
        for j in range(new_num)
    ]
    buckets: list[dict[str, tuple[Any, list[list[int]]]]] = [{} for _ in range(new_num)]
    turn = 0
    for name, (key, held) in sorted(bucket_positions.items()):
        for p in held:
            buckets[turn % new_num].setdefault(name, (key, []))[1].append(p)
            turn += 1
    loads = [
        (sum(len(h) for _, h in buckets[j].values()) + len(pending[j]) if sizes is not None else 0, 0, j)
        for j in range(new_num)
    ]
    heapq.heapify(loads)
    dealt: list[list[int]] = [[] for _ in range(new_num)]  # indices into `ranges`
    for index in sorted(range(len(ranges)), key=lambda i: -range_size(ranges[i])):  # stable: ties keep order
        load, count, j = heapq.heappop(loads)
        dealt[j].append(index)
        heapq.heappush(loads, (load + range_size(ranges[index]), count + 1, j))

    # -- counts -----------------------------------------------------------------------------------
    bad: list[dict[str, int]] = [defaultdict(int) for _ in range(new_num)]
    seen, batches = [0] * new_num, [0] * new_num
    for slot, snap in snaps.items():
        j = slot % new_num
        for reason, count in snap["bad"].items():
            bad[j][reason] += count
        seen[j] += snap["seen"]
        batches[j] += snap.get("batches", 0)
    pass_sizes = [snaps[s].get("pass_size") if s in snaps else None for s in range(old_num)]
    pass_size = math.ceil(sum(pass_sizes) / new_num) if all(p is not None for p in pass_sizes) else None

    workers = max(num_workers, 1)
    new_ranks: dict[str, Any] = {str(rank): {"items": 0, "batches": 0, "snapshots": {}} for rank in range(world_size)}
    for j in range(new_num):
        rng = np.random.default_rng([_SHUFFLE_DOMAIN, _RESPLIT_DOMAIN, seed % (1 << 64), j, epoch + 1])
        my_ranges = [ranges[i] for i in sorted(dealt[j])]
        snap = {
            "version": SNAPSHOT_VERSION,
            "slot": j,
            "num_slots": new_num,
            "epoch": epoch + 1,
            "cursor": [0, 0],
            "balanced": True,
            "epoch_reads": 0,
            "shuffle_rng": rng.bit_generator.state,
            "shuffle": [],
            "buckets": [[key, held] for _, (key, held) in sorted(buckets[j].items())],
            "bad": dict(sorted(bad[j].items())),
            "seen": seen[j],
            "batches": batches[j],
            "since_batch": 0,
            "count_epoch": count_epoch,
            "pass_size": pass_size,
            "first_pass_done": pass_size is not None
            and all(p[0] != count_epoch for p in pending[j])
            and all(r[0] != count_epoch for r in my_ranges),
        }
        if pass_size is None:
            snap["pass_epoch"] = epoch + 1
        if pending[j]:
            snap["pending"] = pending[j]
        if my_ranges:
            snap["ranges"] = my_ranges
        rank_state = new_ranks[str(j // workers)]
        rank_state["snapshots"][str(j)] = snap
        rank_state["batches"] += batches[j]
    for rank_state in new_ranks.values():
        rank_state["snapshots"] = dict(sorted(rank_state["snapshots"].items(), key=lambda kv: int(kv[0])))
    report = {
        "epoch": epoch,
        "old_slots": old_num,
        "new_slots": new_num,
        "old_layout": [old_world, old_workers],
        "new_layout": [world_size, num_workers],
        "leftover_positions": len(shuffle_positions) + sum(len(h) for _, h in bucket_positions.values()),
        "leftover_ranges": len(ranges),
        "leftover_samples": len(shuffle_positions)
        + sum(len(h) for _, h in bucket_positions.values())
        + sum(range_size(r) for r in ranges),
        "dropped": dropped,
        "repeats": repeats,
        "repeats_exact": repeats_exact,
    }
    new_state = {**state, "fingerprint": current, "ranks": new_ranks}
    return new_state, report

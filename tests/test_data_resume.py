"""Exact resume: a loader rebuilt from a JSON round-tripped state_dict continues the same batches.

The data crosses epoch boundaries, holds leftovers in several buckets and a shuffle buffer,
and has one sample without a caption, so snapshots carry all of these.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data_loader import TINY_BAD, collect_keys, image_bytes, make_dataset, stream_config, tiny_hostile_shards

from sgm.data.loader import BucketedLoader, merge_loader_states
from sgm.data.shard_list import shard_sizes, slot_shards
from sgm.data.stream import SlotStream

OPTIONS = {
    "batch_size": 3,
    "base_resolution": 128,
    "shuffle_buffer": 5,
    "flip_probability": 0.5,
    "seed": 11,
    "max_bad_fraction": 0.5,
    "min_seen_for_check": 0,
}


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    no_caption = [("nocaption.jpg", image_bytes(64, 64, seed=1))]
    make_dataset(tmp_path, [9, 7, 8], extra={1: no_caption})
    return [str(tmp_path / f"shard-{i}.tar") for i in range(3)]


def take(loader: BucketedLoader, count: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["__key__"] == b["__key__"] and a["txt"] == b["txt"]
        for name in ("jpg", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            assert torch.equal(a[name], b[name]), name


def buffered_buckets(state: dict) -> int:
    return sum(len(snap["buckets"]) for rank in state["ranks"].values() for snap in rank["snapshots"].values())


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(shards: list[str], workers: int) -> None:
    total, stop = 14, 5  # 42 samples from 24 per epoch: several epochs
    reference = take(BucketedLoader(shards, num_workers=workers, **OPTIONS), total)
    first = BucketedLoader(shards, num_workers=workers, **OPTIONS)
    assert_same_batches(take(first, stop), reference[:stop])
    state = json.loads(json.dumps(first.state_dict()))
    assert buffered_buckets(state) >= 2  # leftovers wait in more than one bucket
    assert any(snap["shuffle"] for snap in state["ranks"]["0"]["snapshots"].values())
    resumed = BucketedLoader(shards, num_workers=workers, **OPTIONS)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, total - stop), reference[stop:])

    whole = BucketedLoader(shards, num_workers=workers, **OPTIONS)
    take(whole, total)
    assert resumed.bad_counts() == whole.bad_counts() and resumed.bad_counts()["missing_caption"] >= 1
    assert resumed.samples_seen() == whole.samples_seen()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_on_a_dataset_smaller_than_the_shuffle_buffer(tmp_path: Path, workers: int) -> None:
    """The buffer capped at one pass, copies waiting in a bucket and the once-only counts all resume."""
    shards = tiny_hostile_shards(tmp_path)
    options = {"batch_size": 2, "square_size": 32, "num_workers": workers, "max_bad_fraction": 1.0}
    reference = take(BucketedLoader(shards, **options), 30)
    for stop in (1, 7, 14):  # with no workers, a copy waits in the bucket at 14
        first = BucketedLoader(shards, **options)
        assert_same_batches(take(first, stop), reference[:stop])
        state = json.loads(json.dumps(first.state_dict()))
        resumed = BucketedLoader(shards, **options)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 30 - stop), reference[stop:])
        assert resumed.bad_counts() == TINY_BAD and resumed.samples_seen() == 7
    snapshots = state["ranks"]["0"]["snapshots"].values()
    assert all(snap["pass_size"] is not None and snap["first_pass_done"] for snap in snapshots)


def test_resume_twice_with_workers_keeps_the_interleaving(shards: list[str]) -> None:
    reference = take(BucketedLoader(shards, num_workers=2, **OPTIONS), 12)
    got, state = [], None
    for stop in (3, 8, 12):  # odd and even stops: worker w must take old worker (w + n) % W
        loader = BucketedLoader(shards, num_workers=2, **OPTIONS)
        if state is not None:
            loader.load_state_dict(state)
        got += take(loader, stop - len(got))
        state = json.loads(json.dumps(loader.state_dict()))
    assert_same_batches(got, reference)


def test_two_ranks_resume_from_one_merged_state(shards: list[str]) -> None:
    def loader(rank: int) -> BucketedLoader:
        return BucketedLoader(shards, rank=rank, world_size=2, **OPTIONS)

    reference = {rank: take(loader(rank), 9) for rank in range(2)}
    runs = {rank: loader(rank) for rank in range(2)}
    for rank, run in runs.items():
        assert_same_batches(take(run, 4), reference[rank][:4])
    merged = json.loads(json.dumps(merge_loader_states([run.state_dict() for run in runs.values()])))
    for rank in range(2):
        resumed = loader(rank)
        resumed.load_state_dict(merged)
        assert_same_batches(take(resumed, 5), reference[rank][4:])
    with pytest.raises(ValueError, match="holds ranks \\[0\\] only, not rank 1"):
        loader(1).load_state_dict(runs[0].state_dict())


def test_changed_settings_are_refused_or_restart_the_epoch(shards: list[str]) -> None:
    first = BucketedLoader(shards, num_workers=0, **OPTIONS)
    take(first, 1)
    state = json.loads(json.dumps(first.state_dict()))
    assert [snap["epoch"] for snap in state["ranks"]["0"]["snapshots"].values()] == [0]
    other = BucketedLoader(shards, num_workers=2, **OPTIONS)
    with pytest.raises(ValueError, match="num_workers was 0, now 2.*on_mismatch='restart_epoch'"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="shards was .*'count': 3.*now .*'count': 2"):
        BucketedLoader(shards[:2], **OPTIONS).load_state_dict(state)
    other.load_state_dict(state, on_mismatch="restart_epoch")  # epoch 0: the same as a fresh start
    assert_same_batches(take(other, 3), take(BucketedLoader(shards, num_workers=2, **OPTIONS), 3))


UNEQUAL = [2, 40, 3, 25, 7, 31, 4, 12, 18, 9]  # 151 samples in 10 shards


def test_unequal_shards_are_balanced_by_samples_over_two_ranks_and_two_workers(tmp_path: Path) -> None:
    """Issue 14.3: 4 slots (2 ranks x 2 workers) read within one shard's size of each other per pass.

    Seed 11, epoch 0: the count split (order[s::4], still used for pipe:/URL shards) gives the
    slots 83/46/11/11 samples (spread 72); the balanced split 40/37/37/37 (spread 3; bound 40).
    """
    info = make_dataset(tmp_path, UNEQUAL)
    urls = [str(tmp_path / f"shard-{i}.tar") for i in range(len(UNEQUAL))]
    assert shard_sizes(urls) == UNEQUAL and shard_sizes(["pipe:cat " + urls[0]]) is None
    for epoch in range(4):
        by_count = [sum(UNEQUAL[i] for i in slot_shards(10, 11, epoch, s, 4)[0]) for s in range(4)]
        parts = [slot_shards(10, 11, epoch, s, 4, UNEQUAL)[0] for s in range(4)]
        by_samples = [sum(UNEQUAL[i] for i in part) for part in parts]
        assert sorted(i for part in parts for i in part) == list(range(10))
        assert max(by_samples) - min(by_samples) <= max(UNEQUAL)
        assert max(by_samples) - min(by_samples) < max(by_count) - min(by_count)
        if epoch == 0:
            assert (by_count, by_samples) == ([83, 46, 11, 11], [40, 37, 37, 37])
    config = stream_config(tmp_path, len(UNEQUAL), seed=11)
    keys = [collect_keys(SlotStream(config, slot, 4)) for slot in range(4)]  # one whole pass each
    assert sorted(k for slot_keys in keys for k in slot_keys) == sorted(info)  # each sample once
    counts = [len(slot_keys) for slot_keys in keys]
    assert counts == [40, 37, 37, 37] and max(counts) - min(counts) <= max(UNEQUAL)


def test_balanced_split_resumes_exactly_over_two_ranks_and_two_workers(tmp_path: Path) -> None:
    make_dataset(tmp_path, UNEQUAL)
    urls = [str(tmp_path / f"shard-{i}.tar") for i in range(len(UNEQUAL))]

    def loader(rank: int) -> BucketedLoader:
        return BucketedLoader(urls, rank=rank, world_size=2, num_workers=2, **OPTIONS)

    total, stop = 30, 13  # 60 batches of 3 from 151 samples: both ranks cross into epoch 1
    reference = {rank: take(loader(rank), total) for rank in range(2)}
    runs = {rank: loader(rank) for rank in range(2)}
    for rank, run in runs.items():
        assert_same_batches(take(run, stop), reference[rank][:stop])
    merged = json.loads(json.dumps(merge_loader_states([run.state_dict() for run in runs.values()])))
    snapshots = [snap for rank in merged["ranks"].values() for snap in rank["snapshots"].values()]
    assert len(snapshots) == 4 and all(snap["balanced"] for snap in snapshots)
    assert any(snap["shuffle"] for snap in snapshots)
    for rank in range(2):
        resumed = loader(rank)
        resumed.load_state_dict(merged)
        assert_same_batches(take(resumed, total - stop), reference[rank][stop:])
    old = dict(snapshots[0])
    del old["balanced"]  # a snapshot from before the balanced split keeps the count split
    assert SlotStream(stream_config(tmp_path, len(UNEQUAL)), old["slot"], 4, old)._balanced is False

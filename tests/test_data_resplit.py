"""Resume on another number of readers (on_mismatch="resplit", sgm/data/resplit.py).

Real tar shards of unequal sizes, one square 32 px bucket. Finite streams (num_epochs) end and
flush every partial batch, so "the pass is complete" is simply the end of the stream: the keys
trained before the checkpoint plus those trained after it must be every sample once per pass,
plus exactly the repeats the report states.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_data_loader import make_dataset, sample_members, write_shard

from sgm.data.loader import BucketedLoader, merge_loader_states
from sgm.data.resplit import resplit_state
from sgm.data.shard_list import iter_shard

SIZES = [3, 15, 5, 12, 7, 9, 4, 14, 6, 11]  # 86 samples
OPTIONS = {"batch_size": 2, "square_size": 32, "shuffle_buffer": 4, "seed": 5, "flip_probability": 0.5}


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    make_dataset(tmp_path, SIZES, shapes=[(32, 32)])
    return [str(tmp_path / f"shard-{i}.tar") for i in range(len(SIZES))]


def all_keys(shards: list[str]) -> list[str]:
    return [raw["__key__"] for url in shards for raw in iter_shard(url, lambda *_: None)]


def loaders(shards: list[str], world: int, workers: int = 0, **options) -> list[BucketedLoader]:
    return [
        BucketedLoader(shards, rank=rank, world_size=world, num_workers=workers, **OPTIONS, **options)
        for rank in range(world)
    ]


def step(runs: list[BucketedLoader], iterators: list, count: int) -> list[str]:
    """`count` lockstep steps of every rank; the keys they trained."""
    keys = []
    for _ in range(count):
        for iterator in iterators:
            keys += next(iterator)["__key__"]
    return keys


def merged(runs: list[BucketedLoader]) -> dict:
    return json.loads(json.dumps(merge_loader_states([run.state_dict() for run in runs])))


def resume(shards: list[str], state: dict, world: int, workers: int = 0, **options) -> list[BucketedLoader]:
    runs = loaders(shards, world, workers, **options)
    for run in runs:
        run.load_state_dict(state, on_mismatch="resplit")
    return runs


def drain(runs: list[BucketedLoader]) -> list[str]:
    keys = [key for run in runs for batch in run for key in batch["__key__"]]
    for run in runs:
        run.close()
    return keys


def snapshots(state: dict) -> list[dict]:
    return [snap for rank in state["ranks"].values() for snap in rank["snapshots"].values()]


@pytest.mark.parametrize(("old", "new"), [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 1), (1, 2))])
def test_resplit_trains_the_unfinished_pass_exactly_once(
    shards: list[str], old: tuple[int, int], new: tuple[int, int]
) -> None:
    runs = loaders(shards, *old, num_epochs=1)
    iterators = [iter(run) for run in runs]
    before = step(runs, iterators, 9)
    for run in runs:
        run.close()
    state = merged(runs)
    assert all(snap["epoch"] == 0 for snap in snapshots(state))  # nobody ran ahead
    resumed = resume(shards, state, *new, num_epochs=1)
    reports = [run.resplit_report for run in resumed]
    assert all(report == reports[0] for report in reports)
    report = reports[0]
    assert report["epoch"] == 0 and report["repeats"] == 0
    assert (report["old_slots"], report["new_slots"]) == (old[0] * max(old[1], 1), new[0] * max(new[1], 1))
    assert report["leftover_samples"] == len(all_keys(shards)) - len(before)
    after = drain(resumed)
    counts = Counter(before + after)
    assert counts == Counter(all_keys(shards))  # every sample exactly once: no skip, no repeat
    assert sum(run.samples_seen() for run in resumed) == sum(SIZES)  # counted once, over old and new slots


def test_repeats_of_readers_running_ahead_are_reported_exactly(tmp_path: Path) -> None:
    make_dataset(tmp_path, [20, 2, 4], shapes=[(32, 32)])  # balanced over 2 slots: 20 and 6 samples a pass
    shards = [str(tmp_path / f"shard-{i}.tar") for i in range(3)]
    runs = loaders(shards, 2, num_epochs=2)
    iterators = [iter(run) for run in runs]
    before: list[str] = []
    for _ in range(60):  # until one slot has trained samples of pass 1 while the other is in pass 0
        before += step(runs, iterators, 1)
        state = merged(runs)
        report = resplit_state(state, runs[0].config, 1, 0)[1]
        if report["repeats"] > 0 and {snap["epoch"] for snap in snapshots(state)} == {0, 1}:
            break
    else:
        raise AssertionError("no slot ran ahead")
    for run in runs:
        run.close()
    (resumed,) = resume(shards, state, 1, num_epochs=2)
    assert resumed.resplit_report == report and report["epoch"] == 0
    counts = Counter(before + drain([resumed]))
    dataset = all_keys(shards)
    assert set(counts) == set(dataset) and min(counts.values()) == 2  # both passes complete, nothing skipped
    assert sum(counts.values()) - 2 * len(dataset) == report["repeats"]  # and the only repeats are reported


def test_a_kill_during_the_leftover_drain_resumes_exactly(shards: list[str]) -> None:
    runs = loaders(shards, 2, num_epochs=2)
    iterators = [iter(run) for run in runs]
    step(runs, iterators, 12)
    state = merged(runs)
    reference = list(resume(shards, state, 1, num_epochs=2)[0])
    (first,) = resume(shards, state, 1, num_epochs=2)
    iterator, stop = iter(first), 3
    got = [next(iterator) for _ in range(stop)]
    mid = json.loads(json.dumps(first.state_dict()))
    (snap,) = snapshots(mid)
    assert snap.get("ranges") and snap["ranges"][0][2] > 0  # inside its first leftover range
    second = BucketedLoader(shards, num_workers=0, num_epochs=2, **OPTIONS)
    second.load_state_dict(mid)  # a same-layout resume: no re-split
    got += list(second)
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        assert a["__key__"] == b["__key__"] and torch.equal(a["jpg"], b["jpg"])
    assert second.bad_counts() == {} and second.samples_seen() == sum(SIZES)


@pytest.mark.parametrize("steps", [0, 1])
def test_stride_mode_resplit_counts_a_truncated_shard_once(tmp_path: Path, steps: int) -> None:
    """3 shards over 4 slots: every old slot strides through every shard; one shard is cut. After no
    step no slot has a snapshot (all read from the start); after one, the cut was already counted."""
    make_dataset(tmp_path, [7, 9], shapes=[(32, 32)])
    whole = write_shard(tmp_path / "whole.tar", [m for i in range(6) for m in sample_members(f"c{i}", 32, 32, i)])
    data = Path(whole).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: data.index(b"c4.jpg") + 512 + 100])  # 4 readable samples
    shards = [str(tmp_path / "shard-0.tar"), str(tmp_path / "cut.tar"), str(tmp_path / "shard-1.tar")]
    runs = loaders(shards, 4, num_epochs=1, max_bad_fraction=1.0)
    iterators = [iter(run) for run in runs]
    before = step(runs, iterators, steps)
    state = merged(runs)
    assert len(snapshots(state)) == 4 * steps
    assert sum(snap["bad"].get("truncated_tar", 0) for snap in snapshots(state)) == steps  # counted, or not yet
    (resumed,) = resume(shards, state, 1, num_epochs=1, max_bad_fraction=1.0)
    assert resumed.resplit_report["old_slots"] == 4
    counts = Counter(before + drain([resumed]))
    assert counts == Counter(all_keys(shards)) and len(counts) == 7 + 9 + 4
    assert resumed.bad_counts() == {"truncated_tar": 1}  # four strided ranges read the cut, one counts it
    assert resumed.samples_seen() == 7 + 9 + 4 + 1


def test_a_layout_mismatch_without_resplit_names_the_config_key(shards: list[str]) -> None:
    runs = loaders(shards, 2)
    iterators = [iter(run) for run in runs]
    step(runs, iterators, 1)
    state = merged(runs)
    single = BucketedLoader(shards, **OPTIONS)
    with pytest.raises(
        ValueError, match=r"world_size=2 x num_workers=0 readers, this run has 1 x 0: set resume_reshard=true"
    ):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match="seed was 5, now 6"):  # other differences are never re-split
        BucketedLoader(shards, **{**OPTIONS, "seed": 6}).load_state_dict(state, on_mismatch="resplit")
    custom = BucketedLoader(shards, reshard_key="data.resume_reshard=true", **OPTIONS)
    with pytest.raises(ValueError, match="set data.resume_reshard=true"):
        custom.load_state_dict(state)
    with pytest.raises(ValueError, match="every old rank"):
        single.load_state_dict(runs[0].state_dict(), on_mismatch="resplit")


def test_a_resplit_during_the_drain_of_a_resplit_keeps_the_pass_exact(shards: list[str]) -> None:
    """2 -> 1 ranks, killed mid-drain, then 1 -> 2 x 1 worker: the leftover of the leftover is dealt."""
    runs = loaders(shards, 2, num_epochs=1)
    iterators = [iter(run) for run in runs]
    before = step(runs, iterators, 5)
    (middle,) = resume(shards, merged(runs), 1, num_epochs=1)
    iterator = iter(middle)
    before += [key for _ in range(4) for key in next(iterator)["__key__"]]
    state = merged([middle])
    (snap,) = snapshots(state)
    assert snap.get("ranges") and snap["epoch"] == 1  # still draining pass 0
    resumed = resume(shards, state, 2, 1, num_epochs=1)
    assert resumed[0].resplit_report["epoch"] == 0
    assert Counter(before + drain(resumed)) == Counter(all_keys(shards))
    assert sum(run.samples_seen() for run in resumed) == sum(SIZES)


def test_an_endless_stream_drains_its_leftover_and_settles_into_the_new_split(shards: list[str]) -> None:
    runs = loaders(shards, 2)
    iterators = [iter(run) for run in runs]
    before = step(runs, iterators, 7)
    (resumed,) = resume(shards, merged(runs), 1)
    iterator, after = iter(resumed), []
    for _ in range(200):
        after += next(iterator)["__key__"]
        (snap,) = snapshots(resumed.state_dict())
        if snap["first_pass_done"]:
            break
    assert not snap.get("pending") and not snap.get("ranges") and snap["epoch"] >= 2
    assert snap["pass_size"] == sum(SIZES)  # the first own epoch (1) of the one new slot: the whole dataset
    assert set(before + after) == set(all_keys(shards)) and resumed.samples_seen() == sum(SIZES)

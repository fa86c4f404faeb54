"""Two real processes (gloo on 127.0.0.1) iterate the loader in lockstep, as DDP would.

Part A: balanced data, a few steps inside epoch 0: the ranks' keys are disjoint and come from
their own slots' shards. Part B: one rank's shards hold 3x fewer samples, so it wraps into new
epochs much sooner; with an all_reduce per step both ranks must still finish every step (an
epoch-bounded loader would leave one rank waiting in the collective forever).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS_A, STEPS_B = 3, 12
SQUAREISH = [(96, 128), (128, 96)]  # two aspect ratios: buckets fill fast


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, port: int, root: str, workers: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from sgm.data.loader import BucketedLoader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result: dict = {}
        options = {"batch_size": 2, "base_resolution": 128, "num_workers": workers, "shuffle_buffer": 3, "seed": 2}
        options["multiprocessing_context"] = "fork"  # a spawned rank would spawn its workers too: slow
        for part, steps in (("A", STEPS_A), ("B", STEPS_B)):
            loader = BucketedLoader(f"{root}/{part}/shard-{{0..3}}.tar", **options)  # rank, world from dist
            keys, done = [], 0
            for _, batch in zip(range(steps), loader):
                keys += batch["__key__"]
                total = torch.tensor([len(batch["__key__"])])
                dist.all_reduce(total)  # the collective DDP runs every step
                done += 1
            result[part] = {"keys": keys, "steps": done, "rank": loader.rank, "world": loader.world_size}
            loader.close()
        Path(root, f"result-{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("workers", [1, 2])
def test_two_processes_step_in_lockstep_with_disjoint_keys(tmp_path: Path, workers: int) -> None:
    from test_data_loader import make_dataset

    from sgm.data.shard_list import num_slots_for, slot_shards

    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    info_a = make_dataset(tmp_path / "A", [6, 6, 6, 6], shapes=SQUAREISH)
    make_dataset(tmp_path / "B", [12, 4, 12, 4], shapes=SQUAREISH)
    context = mp.start_processes(
        run_rank, args=(free_port(), str(tmp_path), workers), nprocs=2, join=False, start_method="spawn"
    )
    for process in context.processes:
        process.join(timeout=120)
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "a rank hung (waiting in a collective the other rank never reached)"
    assert [p.exitcode for p in context.processes] == [0, 0]

    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(2)]
    assert [(r["A"]["rank"], r["A"]["world"]) for r in results] == [(0, 2), (1, 2)]
    assert [r["B"]["steps"] for r in results] == [STEPS_B, STEPS_B]
    assert [r["A"]["steps"] for r in results] == [STEPS_A, STEPS_A]
    keys = [set(r["A"]["keys"]) for r in results]
    assert len(results[0]["A"]["keys"]) == len(keys[0]) == 2 * STEPS_A and not keys[0] & keys[1]
    slots = num_slots_for(2, workers)
    for rank in range(2):  # epoch 0: each rank reads only its own slots' shards
        mine = range(rank * workers, (rank + 1) * workers)
        own = {shard for slot in mine for shard in slot_shards(4, 2, 0, slot, slots)[0]}
        assert {info_a[key]["shard"] for key in keys[rank]} <= own
    for result in results:  # 24 samples per rank from 16 per epoch: every rank wrapped into epoch 1
        assert len(set(result["B"]["keys"])) < len(result["B"]["keys"])

"""Resume on another number of processes (`resume_reshard=true`): 1 -> 2 -> 1 processes under DDP through
`python train.py` on CPU (gloo), the data position re-split each time (sgm/data/resplit.py; its exact
sample guarantee is tested in tests/test_data_resplit.py). Without the key the resume stops with one
message naming it, before anything is written. DeepSpeed ZeRO-2/3: tests/test_parallel_reshard.py, and ZeRO-2 2 -> 1 through train.py in
tests/test_training_exact_resume.py."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from test_data_loader import make_dataset
from test_data_resplit import OPTIONS, SIZES, all_keys, merged
from training_utils import fast_overrides, make_shards, train_cli

from sgm.data.loader import BucketedLoader
from sgm.parallel import read_training_checkpoint
from sgm.training.datamodule import SDXLDataModule
from sgm.training.preflight import ConfigError

DDP = ["strategy=ddp", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("demo"), num_samples=40, num_emoji=4, samples_per_shard=10)


def loader_ranks(run_dir) -> list[str]:
    return sorted(read_training_checkpoint(run_dir / "checkpoints" / "last.ckpt")["SDXLDataModule"]["loader"]["ranks"])


@pytest.mark.slow
def test_ddp_run_continues_from_one_to_two_processes_and_back(tmp_path, shards):
    run_dir = tmp_path / "run"

    def run(steps: int, devices: int, *extra: str):
        overrides = fast_overrides(run_dir, shards, max_steps=steps, every=2) + DDP + [f"trainer.devices={devices}"]
        return train_cli([*overrides, "module.ema_decay=0.9", *extra], timeout=300)

    first = run(2, 1)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    recorded = (run_dir / "config.yaml").read_text()
    refused = run(4, 2)
    assert refused.returncode == 2 and "resume_reshard=true" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    assert (run_dir / "config.yaml").read_text() == recorded  # refused before the run dir was touched
    assert read_training_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2  # untouched

    grown = run(4, 2, "resume_reshard=true")
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "re-split from 1 to 2 readers" in grown.stdout
    assert loader_ranks(run_dir) == ["0", "1"]
    shrunk = run(6, 1, "resume_reshard=true")
    assert shrunk.returncode == 0, shrunk.stdout[-3000:] + shrunk.stderr[-3000:]
    assert "re-split from 2 to 1 readers" in shrunk.stdout
    last = read_training_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and int(last["state_dict"]["ema.num_updates"]) == 6
    assert loader_ranks(run_dir) == ["0"]
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_the_data_module_resplits_only_when_asked_and_restarts_the_pass_on_allowed_changes(tmp_path):
    """The config keys reach the loader: resume_reshard=true re-splits a 2-rank position over 1 rank (the pass
    then completes with every sample once), false stops naming the key; resume_allow_changes=true turns
    changed data settings into a restart of the pass instead of an error."""
    make_dataset(tmp_path, SIZES, shapes=[(32, 32)])
    shards = [str(tmp_path / f"shard-{i}.tar") for i in range(len(SIZES))]
    old = [BucketedLoader(shards, rank=r, world_size=2, num_epochs=1, **OPTIONS) for r in range(2)]
    iterators = [iter(run) for run in old]
    trained = [key for _ in range(5) for iterator in iterators for key in next(iterator)["__key__"]]
    state = {"loader": merged(old)}

    def module(**flags) -> SDXLDataModule:
        made = SDXLDataModule(partial(BucketedLoader, shards, num_epochs=1, **OPTIONS), **flags)
        made.setup("fit")  # no trainer: rank 0 of 1
        return made

    with pytest.raises(ConfigError, match="resume_reshard=true"):
        module().load_state_dict(state)
    resumed = module(reshard=True)
    resumed.load_state_dict(state)
    rest = [key for batch in resumed.train_dataloader() for key in batch["__key__"]]
    assert resumed.loader.resplit_report["new_slots"] == 1
    assert sorted(trained + rest) == sorted(all_keys(shards))  # nothing skipped, nothing twice

    single = BucketedLoader(shards, num_epochs=1, **OPTIONS)
    next(iter(single))
    changed = {"loader": merged([single])}
    other = partial(BucketedLoader, shards, num_epochs=1, **{**OPTIONS, "batch_size": 3})
    with pytest.raises(ConfigError, match="batch_size.*resume_allow_changes=true"):
        strict = SDXLDataModule(other)
        strict.setup("fit")
        strict.load_state_dict(changed)
    allowed = SDXLDataModule(other, allow_changes=True)
    allowed.setup("fit")
    allowed.load_state_dict(changed)
    assert sorted(k for batch in allowed.train_dataloader() for k in batch["__key__"]) == sorted(all_keys(shards))

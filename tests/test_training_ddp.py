"""A 2-process DDP run on CPU (gloo) through `python train.py`, exported to an official-layout file."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_tiny_model
from training_utils import fast_overrides, make_shards, train_cli

from sgm.checkpoint.io import load_checkpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("demo"), num_samples=32, num_emoji=4, samples_per_shard=8)


def test_two_process_ddp_on_cpu_trains_checkpoints_and_exports(tmp_path, shards):
    run_dir = tmp_path / "ddp"
    overrides = fast_overrides(run_dir, shards, max_steps=4, every=2) + [
        "strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "module.ema_decay=0.9",
    ]
    result = train_cli(overrides, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4
    loader_state = state["SDXLDataModule"]["loader"]
    assert sorted(loader_state["ranks"]) == ["0", "1"]  # both ranks' streams, merged
    model = fresh_tiny_model(seed=9)
    report = load_checkpoint(model, run_dir / "test_full.safetensors")
    assert report is not None
    ema = {
        k.removeprefix("ema.model.unet."): v for k, v in state["state_dict"].items() if k.startswith("ema.model.unet.")
    }
    assert torch.equal(model.unet.out[-1].weight, ema["out.2.weight"])

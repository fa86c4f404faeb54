"""Short in-process training runs on tiny shards: the loss falls, bad losses are skipped then stop the run."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from hydra.utils import instantiate
from training_utils import compose_train, fast_overrides, make_shards

from sgm.training.datamodule import SDXLDataModule
from sgm.training.module import NonFiniteLossError
from sgm.training.run import build_module, build_trainer, main_entry, run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("demo"), num_samples=16, num_emoji=2, samples_per_shard=8)


def read_losses(path) -> list[float]:
    with open(path) as stream:
        return [float(row["train/loss"]) for row in csv.DictReader(stream) if row.get("train/loss")]


def test_a_short_run_lowers_the_loss_and_writes_its_outputs(tmp_path, shards):
    steps = 40
    cfg = compose_train(
        fast_overrides(tmp_path / "run", shards, max_steps=steps, every=steps)
        + [
            "module.lr=2e-3",
            "module.warmup_steps=0",
            "module.ema_decay=0.9",
            "data.square_size=32",
            "samples.height=32",
            "samples.width=32",
            "trainer.gradient_clip_val=1.0",
            "seed=1",
        ]
    )
    outputs = run(cfg)
    losses = read_losses(tmp_path / "run" / "logs" / "metrics.csv")
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, f"loss did not fall: first 8 steps {first:.3f}, last 8 {last:.3f}"
    assert outputs["global_step"] == str(steps)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert outputs["export"].endswith("(EMA weights)") and outputs["samples"].endswith(".png")
    header = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/lr", "train/grad_norm", "train/images_per_second", "train/data_wait_fraction"):
        assert name in header


def test_nonfinite_losses_skip_the_step_then_stop_with_a_clear_error(tmp_path, shards):
    cfg = compose_train(fast_overrides(tmp_path / "run", shards, max_steps=10) + ["module.max_nonfinite_in_row=3"])
    module = build_module(cfg)
    with torch.no_grad():
        module.model.unet.out[-1].bias.fill_(float("nan"))  # every prediction, hence every loss, is NaN
    before = module.model.unet.input_blocks[0][0].weight.detach().clone()
    trainer = build_trainer(cfg, tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.fit(module, datamodule=SDXLDataModule(instantiate(cfg.data)))
    assert module.nonfinite_total == 3
    assert torch.equal(module.model.unet.input_blocks[0][0].weight, before)  # skipped steps change nothing


def test_mostly_bad_data_stops_early_with_a_checkpoint_and_one_message(tmp_path, shards, capsys):
    from test_data_loader import sample_members, write_shard

    data = tmp_path / "data"
    data.mkdir()
    for shard in shards.glob("*.tar"):  # 16 good samples
        shutil.copy(shard, data / shard.name)
    nocaps = [m for i in range(16) for m in sample_members(f"bad{i}", 64, 64, seed=i) if not m[0].endswith(".txt")]
    write_shard(data / "nocaptions.tar", nocaps)
    cfg = compose_train(fast_overrides(tmp_path / "run", data, max_steps=50, every=50) + ["data.num_workers=1"])
    with pytest.raises(SystemExit) as info:
        main_entry(cfg)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[sgm] error:")]
    assert len(errors) == 1 and "Traceback" not in errors[0]
    assert "16 of 32 samples (50.0%) could not be used (missing_caption=16)" in errors[0]
    assert "data.max_bad_fraction=0.01" in errors[0] and "stopped_bad_data.ckpt (step " in errors[0]
    checkpoint = tmp_path / "run" / "checkpoints" / "stopped_bad_data.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert 0 < saved["global_step"] < 10  # the stop came within the first pass, after a few steps

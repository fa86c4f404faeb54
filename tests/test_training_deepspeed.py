"""DeepSpeed ZeRO-2 / ZeRO-3: 2-process runs on CPU (gloo) through `python train.py`, resumed and exported.

Production DeepSpeed needs GPUs; `CPUDeepSpeedStrategy` (the CPU twin of Lightning's strategy) is
put on top of the production YAMLs (configs/strategy/deepspeed_*.yaml), so their DeepSpeed
settings are what runs here. The first run JIT-compiles DeepSpeed's shm_comm op (about a minute, then
cached in this environment's TORCH_EXTENSIONS_DIR, see conftest.py). The checkpoint-safety and config units
at the end need no processes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import fresh_tiny_model
from test_training_units import make_module
from training_utils import fast_overrides, loader_batch_keys, make_shards, train_cli

from sgm.checkpoint.io import load_checkpoint
from sgm.parallel import (
    COMPLETE_MARKER,
    DeepSpeedPlan,
    check_fits_strategy,
    is_sharded_checkpoint,
    newest_checkpoint,
    plan_for,
    read_training_checkpoint,
    save_training_checkpoint,
    scalar_parameters_to_buffers,
)
from sgm.training import export

CPU_DEEPSPEED = [
    "trainer.strategy._target_=sgm.parallel.deepspeed_cpu.CPUDeepSpeedStrategy",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
]
PROMPT = "a red heart"  # one sample image is enough to show that ZeRO-2 runs draw samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("demo"), num_samples=32, num_emoji=4, samples_per_shard=8)


def deepspeed_run(run_dir: Path, shards: Path, strategy: str, max_steps: int, every: int, *extra: str):
    overrides = fast_overrides(run_dir, shards, max_steps=max_steps, every=every)
    overrides += [
        f"strategy={strategy}",
        *CPU_DEEPSPEED,
        "module.ema_decay=0.9",
        "log_batch_keys=true",
        f"samples.prompts=['{PROMPT}']",
        *extra,
    ]
    result = train_cli(overrides, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def loader_stream(shards, tmp_path_factory) -> list[str]:
    """Rank 0's first 6 batches of 2 ranks, as `batch_keys` lists them: what uninterrupted runs train on."""
    overrides = fast_overrides(tmp_path_factory.mktemp("unused"), shards)
    return [",".join(keys) for keys in loader_batch_keys(overrides, rank=0, world_size=2, steps=6).values()]


def batch_keys(run_dir: Path) -> list[str]:
    """Rank 0's sample keys per trained batch, in training order."""
    return [line.split("\t")[1] for line in (run_dir / "batch_keys.tsv").read_text().splitlines()]


def unet_weights(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def optimizer_step_count(checkpoint_dir: Path) -> int:
    shard = min((checkpoint_dir / "checkpoint").glob("*zero_pp_rank_0_*optim_states.pt"))
    state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    inner = state.get("base_optimizer_state") or state["optimizer_state_dict"]
    return int(inner["state"][0]["step"])


def ds_config(checkpoint_dir: Path) -> dict:
    model_state = min((checkpoint_dir / "checkpoint").glob("*model_states.pt"))
    return torch.load(model_state, map_location="cpu", weights_only=False)["ds_config"]


def check_export_matches_ema(run_dir: Path, checkpoint: dict) -> None:
    """The run's exported official file (EMA by default) loads back and holds the checkpoint's EMA, not the raw weights."""
    ema = unet_weights(checkpoint["state_dict"], "ema.model.unet.")
    raw = unet_weights(checkpoint["state_dict"], "model.unet.")
    assert ema.keys() == raw.keys() and all(v.dtype == torch.float32 for v in ema.values())  # fp32 EMA under bf16
    differ = [k for k in raw if not torch.equal(ema[k], raw[k])]
    assert len(differ) > 0.9 * len(raw) and "out.2.weight" in differ
    gap = max((ema[k] - raw[k]).abs().max().item() for k in raw)  # an average of the recent weights, not garbage:
    assert gap < 5e-3  # a few steps at lr <= 3e-4 move weights by ~1e-4 (zeros or stale shards would be ~1e-2 off)
    model = fresh_tiny_model(seed=9)
    load_checkpoint(model, run_dir / "test_full.safetensors")
    for name, param in model.unet.named_parameters():
        assert torch.equal(param, ema[name]), name


@pytest.fixture(scope="module")
def zero2_run(shards, tmp_path_factory):
    """ZeRO-2 for 2 steps, then resume=auto to step 4 with optimizer offload and clipping at 0.5."""
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    first = deepspeed_run(run_dir, shards, "deepspeed_zero2", 2, 2)
    resumed = deepspeed_run(
        run_dir, shards, "deepspeed_zero2_offload", 4, 2, "trainer.gradient_clip_val=0.5", "resume_allow_changes=true"
    )  # the clipping differs from the recorded config
    return run_dir, first, resumed


@pytest.mark.slow
def test_zero2_writes_complete_sharded_checkpoints_and_samples_with_the_ema(zero2_run):
    run_dir, first, _ = zero2_run
    folder = run_dir / "checkpoints"
    for name in ("step000002.ckpt", "step000004.ckpt", "last.ckpt"):
        assert is_sharded_checkpoint(folder / name) and (folder / name / COMPLETE_MARKER).is_file(), name
    assert len(list((folder / "last.ckpt" / "checkpoint").glob("*optim_states.pt"))) == 2  # one shard per rank
    assert "[sgm] samples: " in first.stdout and list((run_dir / "samples").glob("*.png"))


@pytest.mark.slow
def test_zero2_resume_continues_steps_optimizer_data_and_ema(zero2_run, loader_stream, tmp_path):
    run_dir, _, resumed = zero2_run
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"resuming from {last}" in resumed.stdout
    checkpoint = read_training_checkpoint(last)
    assert checkpoint["global_step"] == 4 and int(checkpoint["state_dict"]["ema.num_updates"]) == 4
    assert optimizer_step_count(last) == 4  # AdamW state came back from the shards, not restarted
    config = ds_config(last)
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["gradient_clipping"] == 0.5  # trainer.gradient_clip_val reaches DeepSpeed
    assert sorted(checkpoint["SDXLDataModule"]["loader"]["ranks"]) == ["0", "1"]
    with open(run_dir / "logs" / "metrics.csv") as stream:  # the first attempt's rows, then the resumed run's
        rows = [
            (int(row["step"]), float(row["train/grad_norm"]))
            for row in csv.DictReader(stream)
            if row.get("train/grad_norm")
        ]
    assert [step for step, _ in rows] == list(range(4)) and all(0 < n < float("inf") for _, n in rows)
    assert batch_keys(run_dir) == loader_stream[:4]  # the same batches as an uninterrupted run, across the resume
    check_export_matches_ema(run_dir, checkpoint)
    out = tmp_path / "raw_unet.safetensors"  # the export command on the sharded directory, raw weights
    assert export.main([str(last), str(out), "--raw", "--unet-only"]) == 0  # the model config: the run's
    model = fresh_tiny_model(seed=4)
    load_checkpoint(model, out, parts=["unet"])
    raw = unet_weights(checkpoint["state_dict"], "model.unet.")
    assert all(torch.equal(p, raw[n]) for n, p in model.unet.named_parameters())


@pytest.mark.slow
def test_zero3_with_accumulation_trains_checkpoints_and_exports_the_gathered_ema(shards, tmp_path, loader_stream):
    run_dir = tmp_path / "zero3"
    result = deepspeed_run(run_dir, shards, "deepspeed_zero3", 3, 3, "trainer.accumulate_grad_batches=2")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert len(list((last / "checkpoint").glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2
    assert "no validation samples" in result.stdout and not (run_dir / "samples").exists()
    checkpoint = read_training_checkpoint(last)
    assert checkpoint["global_step"] == 3 and int(checkpoint["state_dict"]["ema.num_updates"]) == 3  # per step
    assert ds_config(last)["gradient_accumulation_steps"] == 2
    check_export_matches_ema(run_dir, checkpoint)
    assert batch_keys(run_dir) == loader_stream  # 6 batches in 3 steps: the stream ZeRO-2 trained on, in order


# -- no processes -------------------------------------------------------------------------------
class CrashingTrainer:
    """Stands in for a trainer whose save writes a DeepSpeed-like directory, then dies (or not) mid-save."""

    is_global_zero, global_step = True, 2

    def __init__(self, crash: bool) -> None:
        self.crash = crash

    def save_checkpoint(self, path, weights_only: bool = False) -> None:
        (Path(path) / "checkpoint").mkdir(parents=True)
        (Path(path) / "latest").write_text("checkpoint")
        if self.crash:
            raise RuntimeError("killed mid-save")


def test_a_crash_mid_save_leaves_resume_auto_the_last_complete_checkpoint(tmp_path):
    save_training_checkpoint(CrashingTrainer(crash=False), tmp_path / "step000002.ckpt")
    save_training_checkpoint(CrashingTrainer(crash=False), tmp_path / "last.ckpt")
    assert newest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    with pytest.raises(RuntimeError, match="mid-save"):
        save_training_checkpoint(CrashingTrainer(crash=True), tmp_path / "last.ckpt")  # its rewrite dies
    assert is_sharded_checkpoint(tmp_path / "last.ckpt")  # half-written, and not counted:
    assert newest_checkpoint(tmp_path) == tmp_path / "step000002.ckpt"


def test_checkpoint_and_strategy_mismatches_name_the_fix(tmp_path):
    save_training_checkpoint(CrashingTrainer(crash=False), tmp_path / "ds.ckpt")
    (tmp_path / "file.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="DeepSpeed checkpoint directory but the strategy is not DeepSpeed"):
        check_fits_strategy(tmp_path / "ds.ckpt", "ddp")
    with pytest.raises(ValueError, match="resumes only from its own checkpoint directories"):
        check_fits_strategy(tmp_path / "file.ckpt", "deepspeed_stage_2")
    check_fits_strategy(tmp_path / "ds.ckpt", "deepspeed_stage_2")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        read_training_checkpoint(tmp_path / "plain")
    assert isinstance(plan_for({"_target_": "sgm.parallel.deepspeed_cpu.CPUDeepSpeedStrategy"}), DeepSpeedPlan)
    assert isinstance(plan_for("deepspeed_stage_2"), DeepSpeedPlan) and not isinstance(plan_for("ddp"), DeepSpeedPlan)


def test_ema_stays_fp32_and_whole_when_deepspeed_casts_the_module():
    """DeepSpeed casts every parameter of the module it wraps to bf16 (and partitions them under ZeRO-3):
    the EMA is kept out of the module tree, yet saved, loaded and moved with the module."""
    module = make_module(ema_decay=0.9, save_frozen_parts=True)
    names = scalar_parameters_to_buffers(module.model)  # DeepSpeed cannot broadcast 0-dim parameters
    assert names == ["conditioner.embedders.1.model.logit_scale"] and all(p.dim() > 0 for p in module.parameters())
    assert "model.conditioner.embedders.1.model.logit_scale" in module.state_dict()  # same checkpoint key
    for param in module.parameters():  # what DeepSpeed's bf16 set-up does to the wrapped module
        param.data = param.data.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in module.ema.weights().values())
    state = module.state_dict()
    assert state["ema.model.unet.out.2.weight"].dtype == torch.float32 and "ema.num_updates" in state
    module.double()  # .to / .double / .cuda reach the EMA
    assert module.ema.weights()["model.unet.out.2.weight"].dtype == torch.float64

"""The parallelism seam on its own: plan selection, what each plan answers, checkpoint forms. No processes.

The sharded paths themselves (ZeRO-2/3 runs, consolidation of their directories) run in
tests/test_training_deepspeed.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from omegaconf import OmegaConf
from torch import nn

from sgm.models.build import config_root
from sgm.parallel import (
    COMPLETE_MARKER,
    DeepSpeedPlan,
    ParallelPlan,
    check_fits_strategy,
    is_sharded_checkpoint,
    newest_checkpoint,
    plan_for,
    read_training_checkpoint,
    save_training_checkpoint,
    scalar_parameters_to_buffers,
)
from sgm.parallel.deepspeed_cpu import CPUDeepSpeedStrategy

ZERO3 = {"zero_optimization": {"stage": 3}}
OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


def shipped_strategy(name: str):
    """The `trainer.strategy` value of configs/strategy/<name>.yaml."""
    return OmegaConf.load(config_root() / "strategy" / f"{name}.yaml").strategy


# -- plan selection ------------------------------------------------------------------------------
def test_plans_from_lightning_strategy_objects():
    assert type(plan_for(DDPStrategy())) is ParallelPlan
    assert type(plan_for(SingleDeviceStrategy(device=torch.device("cpu")))) is ParallelPlan
    assert type(plan_for(None)) is ParallelPlan
    strategy = DeepSpeedStrategy(config=ZERO3)
    plan = plan_for(strategy)
    assert isinstance(plan, DeepSpeedPlan) and plan.stage == 3 and plan.strategy is strategy
    assert isinstance(plan_for(CPUDeepSpeedStrategy(config=OFFLOAD)), DeepSpeedPlan)
    assert plan_for(plan) is plan


@pytest.mark.parametrize(
    ("name", "kind", "stage", "offload", "rank0_samples"),
    [
        ("auto", ParallelPlan, None, False, True),
        ("cpu", ParallelPlan, None, False, True),
        ("ddp", ParallelPlan, None, False, True),
        ("gpu", ParallelPlan, None, False, True),
        ("deepspeed_zero2", DeepSpeedPlan, 2, False, True),
        ("deepspeed_zero2_offload", DeepSpeedPlan, 2, True, True),
        ("deepspeed_zero3", DeepSpeedPlan, 3, False, False),
    ],
)
def test_plans_of_the_shipped_strategy_configs(name, kind, stage, offload, rank0_samples):
    plan = plan_for(shipped_strategy(name))  # an OmegaConf node, as the composed config holds it
    assert type(plan) is kind and plan.offloads_optimizer is offload
    assert plan.samples_on_rank_zero is rank0_samples and plan.weights_restored_after_load is (stage == 3)
    if stage is not None:
        assert plan.stage == stage
    if name == "deepspeed_zero2_offload":
        assert plan.bucket_elements == 400_000_000  # reduce + allgather bucket of the YAML


def test_plans_from_registry_names_and_unsupported_engines():
    assert plan_for("deepspeed_stage_3").stage == 3 and plan_for("deepspeed_stage_2_offload").offloads_optimizer
    assert type(plan_for("ddp_find_unused_parameters_true")) is ParallelPlan
    by_arguments = plan_for({"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy", "stage": 3})
    assert by_arguments.stage == 3 and plan_for(DeepSpeedStrategy(stage=2, offload_optimizer=True)).offloads_optimizer
    with pytest.raises(ValueError, match="FSDP.*strategy=ddp"):
        plan_for("fsdp")
    with pytest.raises(ValueError, match="FSDP"):
        plan_for({"_target_": "lightning.pytorch.strategies.FSDPStrategy"})


# -- what a plan answers -------------------------------------------------------------------------
def test_only_ddp_skips_a_nonfinite_step():
    assert ParallelPlan().cannot_skip_step(7) is None
    reason = DeepSpeedPlan(ZERO3).cannot_skip_step(7)
    assert "at step 7" in reason and "DeepSpeed cannot skip" in reason and "strategy=ddp" in reason


def test_grad_norm_from_grads_or_from_the_engine():
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    assert ParallelPlan().grad_norm(params).item() == pytest.approx(5.0)
    assert ParallelPlan().grad_norm([params[2]]) is None  # no gradients: nothing to log
    assert DeepSpeedPlan(ZERO3).grad_norm(params) is None


class FakeEngine:
    """What a DeepSpeedPlan reads from the engine: its step count and last gradient norm."""

    def __init__(self) -> None:
        self.global_steps = 0

    def get_global_grad_norm(self) -> float:
        return 2.5


def test_optimizer_step_counts_only_real_engine_steps(monkeypatch):
    engine = FakeEngine()
    plan = DeepSpeedPlan(OFFLOAD, strategy=SimpleNamespace(model=engine))
    monkeypatch.setattr(plan, "engine", lambda: engine)
    with plan.optimizer_step() as step:
        pass  # a micro-batch the engine only accumulated
    assert not step.stepped and step.grad_norm is None
    with plan.optimizer_step() as step:
        engine.global_steps += 1
    assert step.stepped and step.grad_norm == 2.5
    with ParallelPlan().optimizer_step() as step:
        pass
    assert step.stepped and step.grad_norm is None


def test_prepare_model_and_whole_parameters():
    module = nn.Module()
    module.scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)
    module.weight = nn.Parameter(torch.ones(2))
    ParallelPlan().prepare_model(module)
    assert "scale" in dict(module.named_parameters())
    DeepSpeedPlan(ZERO3).prepare_model(module)  # DeepSpeed cannot broadcast 0-dim parameters
    assert "scale" in dict(module.named_buffers()) and "scale" not in dict(module.named_parameters())
    assert scalar_parameters_to_buffers(module) == []
    named = list(module.named_parameters())
    assert list(ParallelPlan().whole_parameters(named)) == [named]
    assert list(DeepSpeedPlan(ZERO3).whole_parameters(named)) == [named]  # not partitioned: no gather


def test_strategy_optimizers_apply_only_where_they_can_step():
    for plan in (ParallelPlan(), DeepSpeedPlan(ZERO3), DeepSpeedPlan(OFFLOAD)):
        plan.check_optimizer("adamw", "cuda")
    DeepSpeedPlan(OFFLOAD).check_optimizer("deepspeed_cpu_adam", "cuda")
    ParallelPlan().check_optimizer("deepspeed_cpu_adam", "cpu")  # CPU parameters: it can step them
    for plan in (ParallelPlan(), DeepSpeedPlan(ZERO3)):
        with pytest.raises(ValueError, match="deepspeed_cpu_adam.*deepspeed_zero2_offload"):
            plan.check_optimizer("deepspeed_cpu_adam", "cuda")


# -- checkpoint forms ----------------------------------------------------------------------------
class DirectoryTrainer:
    """A trainer whose save writes a sharded-looking directory."""

    is_global_zero, global_step = True, 3

    def save_checkpoint(self, path, weights_only: bool = False) -> None:
        (Path(path) / "checkpoint").mkdir(parents=True)
        (Path(path) / "checkpoint" / "shard.pt").write_bytes(b"new")
        (Path(path) / "latest").write_text("checkpoint")


def test_save_bracket_replaces_a_directory_and_marks_it_complete(tmp_path):
    target = tmp_path / "last.ckpt"
    (target / "checkpoint").mkdir(parents=True)
    (target / "checkpoint" / "stale_rank_3.pt").write_bytes(b"old")  # from another world size
    save_training_checkpoint(DirectoryTrainer(), target)
    assert is_sharded_checkpoint(target) and (target / COMPLETE_MARKER).read_text() == "3\n"
    assert sorted(p.name for p in (target / "checkpoint").iterdir()) == ["shard.pt"]
    (tmp_path / "half.ckpt").mkdir()
    (tmp_path / "half.ckpt" / "latest").write_text("checkpoint")  # never marked: not resumable
    assert newest_checkpoint(tmp_path) == target


def test_checkpoint_must_fit_the_strategy(tmp_path):
    save_training_checkpoint(DirectoryTrainer(), tmp_path / "ds.ckpt")
    torch.save({"state_dict": {}, "global_step": 1}, tmp_path / "file.ckpt")
    check_fits_strategy(tmp_path / "file.ckpt", "ddp")
    check_fits_strategy(tmp_path / "ds.ckpt", shipped_strategy("deepspeed_zero3"))
    with pytest.raises(ValueError, match="not DeepSpeed: resume with the strategy that wrote it"):
        check_fits_strategy(tmp_path / "ds.ckpt", DDPStrategy())
    with pytest.raises(ValueError, match="single-file checkpoint but the strategy is DeepSpeed"):
        check_fits_strategy(tmp_path / "file.ckpt", shipped_strategy("deepspeed_zero2"))


def test_read_training_checkpoint_of_a_file_and_bad_paths(tmp_path):
    torch.save({"state_dict": {"model.unet.w": torch.ones(1)}, "global_step": 5}, tmp_path / "file.ckpt")
    checkpoint = read_training_checkpoint(tmp_path / "file.ckpt")
    assert checkpoint["global_step"] == 5 and torch.equal(checkpoint["state_dict"]["model.unet.w"], torch.ones(1))
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        read_training_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        read_training_checkpoint(tmp_path / "plain")


def test_the_seam_is_the_only_training_code_naming_deepspeed():
    root = Path(__file__).resolve().parents[1] / "sgm" / "training"
    for name in ("module.py", "ema.py", "run.py", "trainable.py", "checkpoint_io.py", "callbacks.py", "preemption.py"):
        assert "deepspeed" not in (root / name).read_text().lower(), name

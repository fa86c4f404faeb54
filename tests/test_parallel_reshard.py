"""Resuming DeepSpeed ZeRO-2/3 checkpoints on another number of processes (sgm.parallel.reshard).

The slow tests train for real through `python train.py` (CPUDeepSpeedStrategy, gloo) on N processes,
then resume the checkpoint on M through the API a run calls (`plan.reshard_for_resume` before
`trainer.fit(ckpt_path=...)`), in a script built from the run's own pieces (build_module,
build_trainer): every fp32 master weight and Adam moment must equal the saved partitions put
together (read straight from the shards, not through DeepSpeed's converter), and Lightning's
state (steps, lr scheduler, EMA, data module, `sgm_*`) must come back. The units need no processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from training_utils import REPO, fast_overrides, make_shards, train_cli

from sgm.parallel import (
    COMPLETE_MARKER,
    ParallelPlan,
    is_universal_checkpoint,
    newest_checkpoint,
    plan_for,
    prepare_resharded,
    read_training_checkpoint,
    reshard,
    saved_world_size,
    universal_path,
)

CPU_DEEPSPEED = ["trainer.strategy._target_=sgm.parallel.deepspeed_cpu.CPUDeepSpeedStrategy", "trainer.accelerator=cpu"]

# Resumes args["source"] on this run's processes (Lightning relaunches it per rank) and stops before the
# first step (or trains on to max_steps); rank 0 saves what the engine and Lightning restored.
RESUME_SCRIPT = r'''
import json, sys
from pathlib import Path
args = json.loads(Path(sys.argv[1]).read_text())
sys.path.insert(0, args["tests"])
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from training_utils import compose_train
from sgm.parallel import plan_for
from sgm.training import datamodule
from sgm.training.run import build_module, build_trainer


class SDXLDataModule(datamodule.SDXLDataModule):  # same class name: Lightning restores its state by name
    """Keeps the restored loader state (mapping it to a new world size is the run's part)."""

    restored = None

    def load_state_dict(self, state_dict):
        self.restored = state_dict


class Capture(pl.Callback):
    def __init__(self, stop):
        self.stop = stop

    def on_train_start(self, trainer, module):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        engine = trainer.strategy.deepspeed_engine
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        out = {key: {} for key in ("fp32", "exp_avg", "exp_avg_sq", "lp")}
        for name, param in named:  # collectives: every rank
            out["fp32"][name] = safe_get_full_fp32_param(param).clone()
            out["exp_avg"][name] = safe_get_full_optimizer_state(param, "exp_avg").clone()
            out["exp_avg_sq"][name] = safe_get_full_optimizer_state(param, "exp_avg_sq").clone()
        for chunk in plan_for(trainer.strategy).whole_parameters(named):
            out["lp"].update((n, p.detach().clone()) for n, p in chunk)
        out["steps"] = sorted({int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})
        out["global_step"], out["engine_steps"] = trainer.global_step, engine.global_steps
        out["lr_schedulers"] = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        out["ema"] = module.ema.state_dict()
        out["data"], out["world_size"] = trainer.datamodule.restored, trainer.world_size
        out["nonfinite_total"], out["batches_trained"] = module.nonfinite_total, module.batches_trained
        if trainer.global_rank == 0:
            torch.save(out, args["out"])
        trainer.should_stop = self.stop


cfg = compose_train(args["overrides"])
module = build_module(cfg, args["source"])
trainer = build_trainer(cfg, Path(cfg.run_dir), [Capture(stop=args["stop"])])
ckpt_path = plan_for(trainer.strategy).reshard_for_resume(args["source"], trainer.world_size)
trainer.fit(module, datamodule=SDXLDataModule(instantiate(cfg.data)), ckpt_path=str(ckpt_path))
'''


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("demo"), num_samples=32, num_emoji=4, samples_per_shard=8)


def overrides(run_dir: Path, shards: Path, strategy: str, devices: int, max_steps: int) -> list[str]:
    return [
        *fast_overrides(run_dir, shards, max_steps=max_steps, every=1),
        f"strategy={strategy}",
        *CPU_DEEPSPEED,
        f"trainer.devices={devices}",
        "module.ema_decay=0.9",
        "samples.every_n_steps=1000",
        "samples.at_train_end=false",
    ]


def train(run_dir: Path, shards: Path, strategy: str, devices: int, steps: int) -> Path:
    """`python train.py` for `steps` steps on `devices` processes; its last checkpoint."""
    result = train_cli(overrides(run_dir, shards, strategy, devices, steps), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir / "checkpoints" / "last.ckpt"


def resume(source: Path, shards: Path, strategy: str, devices: int, tmp: Path, max_steps: int | None = None) -> dict:
    """Resume `source` on `devices` processes (training on to `max_steps`, else stopping before the first
    step): what the engine and Lightning restored, as rank 0 saw it right before training on."""
    spec = tmp / "spec.json"
    out = tmp / "restored.pt"
    steps = max_steps if max_steps is not None else 100
    spec.write_text(
        json.dumps(
            {
                "tests": str(REPO / "tests"),
                "overrides": overrides(tmp / "run", shards, strategy, devices, steps),
                "source": str(source),
                "out": str(out),
                "stop": max_steps is None,
            }
        )
    )
    (tmp / "resume.py").write_text(RESUME_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(tmp / "resume.py"), str(spec)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return torch.load(out, weights_only=False)


def saved_partitions(checkpoint: Path) -> dict:
    """name -> whole fp32 master weight / exp_avg / exp_avg_sq, put together straight from every rank's
    optimizer shard (independently of DeepSpeed's converter), and the optimizer steps they hold."""
    tag_dir = checkpoint / (checkpoint / "latest").read_text().strip()
    files = sorted(
        tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1])
    )
    shards = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    out: dict = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    steps = set()
    if "param_slice_mappings" in shards[0]:  # ZeRO-2: named fragments of each rank's flat partition
        model = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        shapes = {k: v for group in model["param_shapes"] for k, v in group.items()}
        for group in range(len(shards[0]["param_slice_mappings"])):
            for key in out:
                pieces: dict[str, list] = {}
                for shard in shards:
                    state = shard["base_optimizer_state"]["state"][group]
                    flat = shard["single_partition_of_fp32_groups"][group] if key == "fp32" else state[key]
                    for name, fragment in shard["param_slice_mappings"][group].items():
                        pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
                out[key].update((n, torch.cat(p).view(shapes[n])) for n, p in pieces.items())
            steps |= {int(s["base_optimizer_state"]["state"][group]["step"]) for s in shards}
    else:  # ZeRO-3: every parameter in world-size equal slices (the last padded), one after another
        model = min(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
        groups = torch.load(model, map_location="cpu", weights_only=False)["param_shapes"]
        for index, shapes in enumerate(groups):
            for key in out:
                flats = [
                    s["fp32_flat_groups"][index] if key == "fp32" else s["optimizer_state_dict"]["state"][index][key]
                    for s in shards
                ]
                offset = 0
                for name, shape in shapes.items():
                    numel, part = math.prod(shape), math.ceil(math.prod(shape) / len(shards))
                    out[key][name] = torch.cat([f.narrow(0, offset, part) for f in flats])[:numel].view(shape)
                    offset += part
            steps |= {int(s["optimizer_state_dict"]["state"][index]["step"]) for s in shards}
    out["steps"] = sorted(steps)
    return out


def check_restored_exactly(source: Path, restored: dict, world_size: int) -> None:
    saved = saved_partitions(source)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert restored[key].keys() == saved[key].keys() and len(saved[key]) > 300, key
        differ = [name for name in saved[key] if not torch.equal(restored[key][name], saved[key][name])]
        assert not differ, f"{key}: {differ[:3]}"
    assert {v.dtype for v in restored["lp"].values()} == {torch.bfloat16}  # the engine's weights: the masters, cast
    assert all(torch.equal(restored["lp"][n], restored["fp32"][n].to(torch.bfloat16)) for n in restored["lp"])
    checkpoint = read_training_checkpoint(source)
    step = checkpoint["global_step"]
    assert restored["steps"] == saved["steps"] == [step] and restored["global_step"] == restored["engine_steps"] == step
    assert restored["lr_schedulers"] == checkpoint["lr_schedulers"]
    ema = {k.removeprefix("ema."): v for k, v in checkpoint["state_dict"].items() if k.startswith("ema.")}
    assert restored["ema"].keys() == ema.keys() and all(torch.equal(restored["ema"][k], ema[k]) for k in ema)
    assert restored["data"] == checkpoint["SDXLDataModule"]  # as saved: the saved world size's ranks
    assert restored["nonfinite_total"] == checkpoint["sgm_nonfinite_total"]
    assert restored["batches_trained"] == checkpoint["sgm_batches_trained"] and restored["world_size"] == world_size


@pytest.mark.slow
def test_zero2_saved_on_two_ranks_resumes_on_one_exactly(shards, tmp_path):
    source = train(tmp_path / "zero2", shards, "deepspeed_zero2", devices=2, steps=2)
    assert saved_world_size(source) == 2
    restored = resume(source, shards, "deepspeed_zero2", 1, tmp_path)
    check_restored_exactly(source, restored, world_size=1)
    prepared = universal_path(source)
    assert is_universal_checkpoint(prepared) and saved_world_size(prepared) is None
    assert newest_checkpoint(source.parent) != prepared  # resume=auto still continues the .ckpt
    marker = (prepared / COMPLETE_MARKER).stat().st_mtime_ns
    assert prepare_resharded(source, 1) == prepared and (prepared / COMPLETE_MARKER).stat().st_mtime_ns == marker
    assert prepare_resharded(source, 2) == source  # its own world size: as it is


@pytest.mark.slow
def test_zero3_saved_on_one_rank_resumes_and_trains_on_two(shards, tmp_path):
    source = train(tmp_path / "zero3", shards, "deepspeed_zero3", devices=1, steps=2)
    assert saved_world_size(source) == 1
    restored = resume(source, shards, "deepspeed_zero3", 2, tmp_path, max_steps=3)  # then one step on 2 ranks
    check_restored_exactly(source, restored, world_size=2)
    continued = tmp_path / "run" / "checkpoints" / "last.ckpt"  # saved by the 2 ranks: an ordinary checkpoint
    assert saved_world_size(continued) == 2 and read_training_checkpoint(continued)["global_step"] == 3


# -- no processes -------------------------------------------------------------------------------
def fake_sharded(path: Path, world_size: int) -> Path:
    """A DeepSpeed-like checkpoint directory (names only) saved by `world_size` ranks."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    (path / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"m")
    for rank in range(world_size):
        (path / "checkpoint" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o")
    return path


def fake_convert(calls: list, delay: float = 0.0):
    """Stands in for DeepSpeed's conversion: records the call, writes what a finished folder holds."""

    def convert(source, target, signature, saved, workers):
        calls.append(threading.get_ident())
        time.sleep(delay)
        tmp = target.with_name(target.name + ".tmp")
        (tmp / "checkpoint").mkdir(parents=True)
        (tmp / reshard.LATEST_UNIVERSAL).write_text("checkpoint")
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"signature": signature}))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)

    return convert


def test_world_sizes_and_what_loads_as_it_is(tmp_path):
    source = fake_sharded(tmp_path / "last.ckpt", 2)
    (tmp_path / "ddp.ckpt").write_bytes(b"x")
    assert saved_world_size(source) == 2 and saved_world_size(tmp_path / "ddp.ckpt") is None
    assert prepare_resharded(tmp_path / "ddp.ckpt", 3) == tmp_path / "ddp.ckpt"  # a file loads anywhere
    assert prepare_resharded(source, 2) == source and not universal_path(source).exists()
    assert universal_path(source) == tmp_path / "last.universal"
    assert ParallelPlan().reshard_for_resume(tmp_path / "ddp.ckpt", 4) == tmp_path / "ddp.ckpt"
    with pytest.raises(ValueError, match="make the plan from the trainer's strategy"):
        plan_for("deepspeed_stage_2").reshard_for_resume(source, 1)


def test_ranks_converting_at_once_convert_once_and_a_new_save_converts_again(tmp_path, monkeypatch):
    source = fake_sharded(tmp_path / "last.ckpt", 2)
    calls: list = []
    monkeypatch.setattr(reshard, "_convert", fake_convert(calls, delay=0.5))
    results: list = []
    ranks = [threading.Thread(target=lambda: results.append(prepare_resharded(source, 1))) for _ in range(4)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert len(calls) == 1 and results == [universal_path(source)] * 4
    assert not list(tmp_path.glob("*.lock")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt",
        "last.universal",
    ]
    assert prepare_resharded(source, 1) == universal_path(source) and len(calls) == 1  # reused
    time.sleep(0.01)
    (source / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"saved again")
    assert prepare_resharded(source, 1) == universal_path(source) and len(calls) == 2  # outdated: converted anew


def test_a_dead_converters_lock_is_broken_and_a_crash_leaves_nothing_half(tmp_path, monkeypatch):
    source = fake_sharded(tmp_path / "last.ckpt", 2)
    target = universal_path(source)
    with pytest.raises(Exception):  # noqa: B017 - DeepSpeed's converter fails on these fake shards, mid-way
        prepare_resharded(source, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no folder, no temporary, no lock
    (tmp_path / "last.universal.lock").mkdir()  # left by a process that died converting
    monkeypatch.setattr(reshard, "STALE_S", 0.5)
    calls: list = []
    monkeypatch.setattr(reshard, "_convert", fake_convert(calls))
    assert prepare_resharded(source, 1) == target and len(calls) == 1
    assert is_universal_checkpoint(target) and not list(tmp_path.glob("*.lock*"))
    (tmp_path / "last.universal.lock").mkdir()  # a live converter elsewhere: waited for, then given up on
    monkeypatch.setattr(reshard, "STALE_S", 60.0)
    (source / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"saved again")
    with pytest.raises(TimeoutError, match="delete the lock directory"):
        prepare_resharded(source, 1, timeout_s=0.5)

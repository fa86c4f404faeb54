"""Bit-exact resume: a run SIGKILLed at random moments (one of them in the middle of a checkpoint save) and
continued with resume=auto each time trains the very steps an uninterrupted run trains: the same batches,
noise, noise levels and caption dropout, the same optimizer, LR-schedule and EMA state, so the final
weights, EMA and optimizer state are bit-identical. Real runs through `python train.py` on CPU: one
process with a loader worker, 2-process DDP (gloo) and 2-process DeepSpeed ZeRO-2 (CPUDeepSpeedStrategy)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fresh_tiny_model
from safetensors.torch import load_file
from training_utils import REPO, fast_overrides, make_shards, train_cli

from sgm.models.lora import LoRAConfig, apply_lora
from sgm.parallel import read_training_checkpoint
from sgm.training.callbacks import read_batch_keys

STEPS, EVERY = 12, 3
EXACT = [  # everything that draws randomness or carries state across steps is on
    "log_batch_keys=true",
    "samples.at_train_end=false",
    "module.ema_decay=0.9",
    "module.warmup_steps=4",
    "module.lr_schedule=cosine",
    "model.conditioner.caption_dropout_rate=0.3",
]
DDP = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("demo"), num_samples=40, num_emoji=4, samples_per_shard=10)


def start(overrides: list[str], kill_at_save: int = 0) -> subprocess.Popen:
    """`python train.py` (or the mid-save killer harness) in its own process group, so one kill takes every rank."""
    script = "tests/train_killed_mid_save.py" if kill_at_save else "train.py"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "SGM_TEST_KILL_AT_SAVE": str(kill_at_save)}
    return subprocess.Popen(
        [sys.executable, script, *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "batch_keys.tsv"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_at_random_moments(overrides: list[str], run_dir: Path, kills: int, rng: random.Random) -> int:
    """Start resume=auto runs and SIGKILL each (every rank) a random number of steps in, plus a random delay;
    returns how many were killed before finishing."""
    killed = 0
    for _ in range(kills):
        process = start([*overrides, "resume=auto"])
        target = steps_logged(run_dir) + rng.randint(1, EVERY + 1)
        deadline = time.time() + 240
        while process.poll() is None and steps_logged(run_dir) < target:
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed += 1
        process.communicate()
    return killed


def check_bit_identical(reference: Path, resumed: Path) -> None:
    """The exports (EMA weights, every tensor), the last checkpoints' raw weights + EMA, and the optimizer state."""
    assert read_batch_keys(reference / "batch_keys.tsv") == read_batch_keys(resumed / "batch_keys.tsv")  # rank 0's
    exports = sorted(p.name for p in reference.glob("test_*.safetensors"))  # test_full and/or test_lora
    assert exports and exports == sorted(p.name for p in resumed.glob("test_*.safetensors"))
    for name in exports:
        a, b = load_file(reference / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {len(differ)} of {len(a)} exported tensors differ, e.g. {differ[:3]}"
    first = read_training_checkpoint(reference / "checkpoints" / "last.ckpt")
    second = read_training_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert first["global_step"] == second["global_step"] == STEPS
    assert first["state_dict"].keys() == second["state_dict"].keys()
    assert all(torch.equal(v, second["state_dict"][k]) for k, v in first["state_dict"].items())
    assert first["lr_schedulers"] == second["lr_schedulers"]
    mine, theirs = optimizer_tensors(reference), optimizer_tensors(resumed)
    assert mine and mine.keys() == theirs.keys()
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []


def optimizer_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the last checkpoint's optimizer state (each rank's partition for DeepSpeed), by path."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return dict(flatten(torch.load(last, map_location="cpu", weights_only=False)["optimizer_states"]))
    found: dict[str, torch.Tensor] = {}
    for shard in sorted((last / "checkpoint").glob("*optim_states.pt")):
        found.update(flatten(torch.load(shard, map_location="cpu", weights_only=False), shard.name))
    return found


def flatten(value, path: str = ""):
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from flatten(item, f"{path}/{index}")


def run_killed_and_uninterrupted(tmp_path: Path, shards: Path, extra: list[str], kills: int, seed: int) -> Path:
    """Train STEPS steps uninterrupted and, beside it, killed (mid-save, then `kills` times at random); compare.
    Returns the killed run's directory."""

    def overrides(run_dir: Path) -> list[str]:
        return fast_overrides(run_dir, shards, STEPS, EVERY) + EXACT + extra

    reference = start(overrides(tmp_path / "reference"))  # runs beside the killed one (2 cores)
    killed_dir = tmp_path / "killed"
    mid_save = start(overrides(killed_dir), kill_at_save=3)  # dies half-way through writing its 3rd checkpoint file
    out, _ = mid_save.communicate(timeout=300)
    assert mid_save.returncode == -signal.SIGKILL, out[-3000:]
    assert list((killed_dir / "checkpoints").glob(".*.tmp")) or (killed_dir / "checkpoints").is_dir()
    rng = random.Random(seed)
    assert kill_at_random_moments(overrides(killed_dir), killed_dir, kills, rng) >= min(kills, 1)
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-4000:]
    final = train_cli(overrides(killed_dir) + ["resume=auto"], timeout=300)
    assert final.returncode == 0, final.stdout[-4000:] + final.stderr[-4000:]
    check_bit_identical(tmp_path / "reference", killed_dir)
    return killed_dir


@pytest.mark.slow
def test_single_process_with_a_worker_killed_repeatedly_resumes_bit_exact(tmp_path, shards):
    run_killed_and_uninterrupted(tmp_path, shards, ["data.num_workers=1"], kills=3, seed=1)


def lora_keys(parts: dict[str, LoRAConfig]) -> set[str]:
    """The kohya keys a LoRA of these parts has on the tiny model."""
    return set(apply_lora(fresh_tiny_model(), parts).state_dict())


@pytest.mark.slow
def test_two_process_ddp_killed_repeatedly_resumes_bit_exact(tmp_path, shards):
    """A UNet LoRA beside CLIP-L trained in full at its own lr (both files exported, both bit-identical):
    under DDP every weight in the optimizer must get a gradient, adapters included."""
    modes = [
        "module.trainable.unet={mode:lora,lora:{rank:4,targets:attn_mlp}}",
        "+module.trainable.text_encoder_0={lr:1.0e-5}",
    ]
    killed = run_killed_and_uninterrupted(tmp_path, shards, [*DDP, *modes], 1, seed=2)
    assert set(load_file(killed / "test_lora.safetensors")) == lora_keys({"unet": LoRAConfig(4, targets="attn_mlp")})
    assert (killed / "test_full.safetensors").is_file()  # CLIP-L trained in full: the full file too


@pytest.mark.slow
def test_zero2_killed_mid_save_resumes_bit_exact_then_continues_on_one_process(tmp_path, shards):
    """A LoRA (UNet + bigG adapters) under ZeRO-2 on 2 processes, killed mid-save: bit-exact. Then the same run on 1 process (resume_reshard=true,
    through train.py): DeepSpeed's universal form is made, loaded and removed once the run saved its own
    checkpoint, and the data position is re-split (exactness of both: test_parallel_reshard.py,
    test_data_resplit.py)."""
    zero2 = [
        "strategy=deepspeed_zero2",
        "trainer.strategy._target_=sgm.parallel.deepspeed_cpu.CPUDeepSpeedStrategy",
        "trainer.accelerator=cpu",
    ]
    lora = [
        "module.trainable.unet={mode:lora,lora:{rank:4,targets:attn_mlp}}",
        "+module.trainable.text_encoder_1={mode:lora,lora:{rank:2}}",
    ]
    zero2 += lora
    killed = run_killed_and_uninterrupted(tmp_path, shards, [*zero2, "trainer.devices=2"], kills=0, seed=3)
    expected = lora_keys({"unet": LoRAConfig(4, targets="attn_mlp"), "text_encoder_1": LoRAConfig(2)})
    assert set(load_file(killed / "test_lora.safetensors")) == expected  # the key set DDP's LoRA has, + bigG's
    assert not (killed / "test_full.safetensors").exists()  # adapters only: the base is the run's recorded one
    overrides = fast_overrides(killed, shards, STEPS + 2, EVERY) + EXACT + zero2
    shrunk = train_cli([*overrides, "trainer.devices=1", "resume=auto", "resume_reshard=true"], timeout=300)
    assert shrunk.returncode == 0, shrunk.stdout[-3000:] + shrunk.stderr[-3000:]
    assert "re-split from 2 to 1 readers" in shrunk.stdout
    last = read_training_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS + 2 and int(last["state_dict"]["ema.num_updates"]) == STEPS + 2
    assert sorted(last["SDXLDataModule"]["loader"]["ranks"]) == ["0"]
    assert not (killed / "checkpoints" / "last.universal").exists()  # removed after the run's own save

"""Helpers for the training tests: tiny demo shards and composed train configs for fast CPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sgm.models.build import build_model, config_root, load_model_config
from sgm.parallel import DeepSpeedPlan, plan_for
from sgm.training.preflight import OWN_RUN_KEYS

REPO = Path(__file__).resolve().parents[1]


def make_shards(folder: Path, num_samples: int = 48, num_emoji: int = 4, samples_per_shard: int = 16) -> Path:
    """Real emoji demo shards (few samples, few emoji) in `folder`."""
    from sgm.data.demo_dataset import build_demo_dataset

    if not list(folder.glob("*.tar")):
        build_demo_dataset(folder, num_samples=num_samples, num_emoji=num_emoji, samples_per_shard=samples_per_shard)
    return folder


def fast_overrides(run_dir: Path, shards: Path, max_steps: int = 8, every: int = 4) -> list[str]:
    """Hydra overrides for a short tiny run at 64 px on `shards`, writing to `run_dir` (experiment tiny_cpu: the tiny
    model as SDXL trains it; the demo's own data, VAE, held-out set and recipe: tests/test_training_demo.py)."""
    return [
        "experiment=tiny_cpu",
        f"run_dir={run_dir}",
        "name=test",
        f"data.shards={shards}/*.tar",
        "data.base_resolution=null",
        "data.square_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        f"trainer.max_steps={max_steps}",
        f"checkpoint.every_n_train_steps={every}",
        "samples.num_steps=3",
        "samples.seeds=[0]",
        "samples.height=64",
        "samples.width=64",
        "threads=1",
    ]


def compose_train(overrides: list[str]) -> DictConfig:
    """The composed train config, as `python train.py <overrides>` would see it."""
    with initialize_config_dir(config_dir=str(config_root()), version_base=None):
        return compose(config_name="train", overrides=overrides)


def loader_batch_keys(overrides: list[str], rank: int, world_size: int, steps: int) -> dict[int, list[str]]:
    """step -> sample keys of the first `steps` batches of one rank's loader, built from the composed config:
    what an uninterrupted run of these overrides trains on (as BatchKeyLog writes them)."""
    from hydra.utils import instantiate

    cfg = compose_train(overrides)
    batches = iter(instantiate(cfg.data)(rank=rank, world_size=world_size))
    return {step: [str(key) for key in next(batches)["__key__"]] for step in range(steps)}


def train_cli(overrides: list[str], timeout: float = 240, wait: bool = True):
    """Run `python train.py <overrides>` in a subprocess (returns CompletedProcess, or Popen if not wait)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "train.py", *overrides]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check_launcher_config(relative: str) -> None:
    """Compose train.yaml with hydra/launcher=<name> and build the launcher as `-m` would (nothing is submitted)."""
    from hydra.utils import instantiate

    name = Path(relative).with_suffix("").name
    with initialize_config_dir(config_dir=str(config_root()), version_base=None):
        cfg = compose(config_name="train", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert callable(launcher.launch) and launcher.params["submitit_folder"].startswith(f"{cfg.run_dir}/multirun/")
    signal = launcher.params.get("additional_parameters", {}).get("signal", "")
    assert signal.startswith("USR1@"), f"{relative}: preemption needs USR1 (sgm.training.preemption), got {signal!r}"


TRAIN_GROUPS = ("stage", "strategy", "logger", "experiment")
# Full-size models a config may pick: built on the meta device, the run's pieces then with the tiny twin.
FULL_SIZE_STAND_INS = {"sdxl_base": "tiny", "sdxl_refiner": "tiny_refiner"}


def check_train_config(relative: str, tmp_path: Path) -> None:
    """Compose train.yaml (or it with one group option chosen) and build every piece a run builds."""
    import inspect

    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    from sgm.training.run import build_module, build_trainer

    parts = Path(relative).with_suffix("").parts
    overrides = [f"{parts[0]}={'/'.join(parts[1:])}"] if len(parts) >= 2 else []
    if len(parts) == 3 and parts[0] == "experiment" and (REPO / "configs" / "stage" / f"{parts[2]}.yaml").is_file():
        overrides.append(f"stage={parts[2]}")  # a preset's per-stage file (experiment/NAME/<stage>.yaml)
    if parts[0] in OWN_RUN_KEYS:  # a stage (or model, data) of one's own runs without the demo (its rule refuses it)
        overrides.append("~experiment")
    shards = make_shards(tmp_path / "shards", num_samples=8, num_emoji=2, samples_per_shard=8)
    common = [f"data.shards={shards}/*.tar", "data.num_workers=0", f"run_dir={tmp_path / 'run'}", "name=check"]
    cfg = compose_train(overrides + common)
    for full, stand_in in FULL_SIZE_STAND_INS.items():  # a stage that picks a full-size model
        if cfg.model == load_model_config(full):
            build_model(cfg.model, device="meta")
            cfg = compose_train(overrides + common + [f"model={stand_in}"])
    stand_in_user_files(cfg, shards, tmp_path)
    module = build_module(cfg)
    assert isinstance(module, pl.LightningModule)
    loader = instantiate(cfg.data)(rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["latents"].dtype.is_floating_point if "latents" in batch else batch["jpg"].dtype == torch.uint8
    if isinstance(plan_for(cfg.trainer.get("strategy")), DeepSpeedPlan):
        use_cpu_deepspeed(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        unknown = set(cfg.trainer) - set(inspect.signature(pl.Trainer).parameters)
        assert not unknown, f"not Trainer arguments: {unknown}"
        return
    trainer = build_trainer(cfg, tmp_path / "run")
    assert trainer.max_steps == cfg.trainer.max_steps


def use_cpu_deepspeed(cfg: DictConfig) -> None:
    """A DeepSpeed config: build its stock (GPU) strategy as configured, then swap in the CPU test twin
    with the same DeepSpeed settings, so a Trainer can be built on this machine."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy

    stock = instantiate(cfg.trainer.strategy, _convert_="all")
    assert isinstance(stock, DeepSpeedStrategy) and stock.config["zero_optimization"]["stage"] in (2, 3)
    cfg.trainer.strategy._target_ = "sgm.parallel.deepspeed_cpu.CPUDeepSpeedStrategy"
    cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 1


def stand_in_user_files(cfg: DictConfig, shards: Path, tmp_path: Path) -> None:
    """A preset naming the user's own files (a local pretrained checkpoint, cached latents): make tiny
    stand-ins here from the config's (stand-in) model, as a user would: save it, cache `shards` with it."""
    import torch

    from sgm.checkpoint.io import save_checkpoint
    from sgm.data.latent_cache import CacheConfig, cache_latents

    missing_file = bool(cfg.get("pretrained")) and not Path(cfg.pretrained).is_file()
    cached = str(cfg.data.get("_target_", "")).endswith("LatentLoader")
    if not (missing_file or cached):
        return
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.freeze_frozen_parts()
    if missing_file:
        cfg.pretrained = str(save_checkpoint(model, tmp_path / "pretrained_stand_in.safetensors"))
    if cached:
        settings = CacheConfig(square_size=64, latent_mode="mean", text_embeddings=bool(cfg.data.text_embeddings))
        cache_latents(model, f"{shards}/*.tar", tmp_path / "latents", settings, progress=False)
        cfg.data.shards = str(tmp_path / "latents" / "*.tar")

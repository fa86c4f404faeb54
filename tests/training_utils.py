"""Helpers for the training tests: tiny demo shards and composed train configs for fast CPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sgm.models.build import config_root

REPO = Path(__file__).resolve().parents[1]


def make_shards(folder: Path, num_samples: int = 48, num_emoji: int = 4, samples_per_shard: int = 16) -> Path:
    """Real emoji demo shards (few samples, few emoji) in `folder`."""
    from data.build_demo_dataset import build_demo_dataset

    if not list(folder.glob("*.tar")):
        build_demo_dataset(folder, num_samples=num_samples, num_emoji=num_emoji, samples_per_shard=samples_per_shard)
    return folder


def fast_overrides(run_dir: Path, shards: Path, max_steps: int = 8, every: int = 4) -> list[str]:
    """Hydra overrides for a short tiny run at 64 px on `shards`, writing to `run_dir`."""
    return [
        f"run_dir={run_dir}",
        "name=test",
        f"demo_data.out={shards}",
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


def train_cli(overrides: list[str], timeout: float = 240, wait: bool = True):
    """Run `python train.py <overrides>` in a subprocess (returns CompletedProcess, or Popen if not wait)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "train.py", *overrides]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


TRAIN_GROUPS = ("stage", "strategy", "logger", "experiment")


def check_train_config(relative: str, tmp_path: Path) -> None:
    """Compose train.yaml (or it with one group option chosen) and build every piece a run builds."""
    import inspect

    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    from sgm.training.run import build_module, build_trainer

    parts = Path(relative).with_suffix("").parts
    overrides = [f"{parts[0]}={parts[1]}"] if len(parts) == 2 else []
    shards = make_shards(tmp_path / "shards", num_samples=8, num_emoji=2, samples_per_shard=8)
    cfg = compose_train(overrides + [f"data.shards={shards}/*.tar", "data.num_workers=0", f"run_dir={tmp_path / 'run'}"])
    module = build_module(cfg)
    assert isinstance(module, pl.LightningModule)
    loader = instantiate(cfg.data)(rank=0, world_size=1)
    assert next(iter(loader))["jpg"].dtype == torch.uint8
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        unknown = set(cfg.trainer) - set(inspect.signature(pl.Trainer).parameters)
        assert not unknown, f"not Trainer arguments: {unknown}"
        return
    trainer = build_trainer(cfg, tmp_path / "run")
    assert trainer.max_steps == cfg.trainer.max_steps

"""Build models from the shipped Hydra model configs (configs/model/*.yaml) or any such file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sgm import config_dir
from sgm.models.sdxl import SDXL


def config_root() -> Path:
    """The shipped configs/ folder (sgm.config_dir: the checkout's, or the installed package's copy)."""
    return config_dir()


def shipped_model_configs() -> list[str]:
    """Names of the model configs in configs/model/."""
    return sorted(p.stem for p in (config_root() / "model").glob("*.yaml"))


def load_model_config(name_or_path: str | os.PathLike) -> DictConfig:
    """A model config by shipped name (e.g. "sdxl_base", "tiny") or by path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        if not candidate.is_file():
            raise FileNotFoundError(f"model config file not found: {candidate}")
        return OmegaConf.load(candidate)
    path = config_root() / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown model config '{name_or_path}'; shipped configs: {', '.join(shipped_model_configs())} "
            "(or give a path to a .yaml file)"
        )
    return OmegaConf.load(path)


def build_model(config: str | os.PathLike | DictConfig, device: str | torch.device | None = None) -> SDXL:
    """Instantiate an SDXL model; device="meta" builds the full-size ones in a fraction of a second."""
    cfg = config if isinstance(config, DictConfig) else load_model_config(config)
    if device is None:
        return instantiate(cfg)
    with torch.device(device):
        return instantiate(cfg)

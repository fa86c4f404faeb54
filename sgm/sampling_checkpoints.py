"""Load a checkpoint for sampling: a training .ckpt (UNet + EMA) or an official-layout .safetensors.

A training checkpoint (a `.ckpt` file, or a DeepSpeed `.ckpt` directory) holds the UNet and its
EMA only. Its frozen parts (text encoders, VAE) are rebuilt as training built them
(sgm.training.run.build_module): the model config under the run's seed, then the
`pretrained_parts` of the run's `pretrained` file; so a checkpoint samples with the conditioning it
was trained with. The run's `config.yaml` (beside `checkpoints/`) supplies the model config, seed,
pretrained file and denoiser when `--model` / `--pretrained` are not given.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sgm.checkpoint.io import load_checkpoint, read_layout, read_metadata
from sgm.checkpoint.official_layout import PARTS, part_of_key
from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling
from sgm.inspect import match_file
from sgm.models.build import build_model, load_model_config, shipped_model_configs
from sgm.models.sdxl import SDXL
from sgm.training.export import load_training_checkpoint, unet_state_from_checkpoint
from sgm.training.lineage import file_sha256, load_pretrained

FROZEN = {"conditioner": "model.conditioner.", "vae": "model.vae."}


class SampleInputError(ValueError):
    """A user-supplied input (path, model config, option) that sampling cannot use; the CLI prints it."""


@dataclass
class SamplingModel:
    """A model ready to sample, its denoiser, and what it was loaded from (for the PNG metadata)."""

    model: SDXL
    denoiser: DiscreteDenoiser
    info: dict[str, Any] = field(default_factory=dict)


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a file; for a DeepSpeed checkpoint directory, over its files' relative paths and digests."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
    return digest.hexdigest()


def load_sampling_model(
    path: str | os.PathLike,
    model_config: str | None = None,
    use_ema: bool = True,
    pretrained: str | None = None,
) -> SamplingModel:
    """The model in `path` (on CPU, fp32, eval, no grads); see the module docstring for the sources."""
    path = Path(path)
    if not path.exists():
        raise SampleInputError(f"checkpoint not found: {path} (give a run's checkpoints/*.ckpt or a .safetensors file)")
    if pretrained is not None and not Path(pretrained).is_file():
        raise SampleInputError(f"pretrained file not found: {pretrained} (an official-layout .safetensors)")
    loaded = _load_official(path, model_config, use_ema, pretrained) if path.suffix == ".safetensors" else (
        _load_training(path, model_config, use_ema, pretrained))  # fmt: skip
    loaded.model.eval().requires_grad_(False)
    return loaded


def _load_official(path: Path, model_config: str | None, use_ema: bool, pretrained: str | None) -> SamplingModel:
    layout = {k: shape for k, (shape, _) in read_layout(path).items()}
    present = {part_of_key(k) for k in layout} - {None}
    if "unet" not in present:
        raise SampleInputError(f"{path} holds no UNet weights (model.diffusion_model.*); give a model checkpoint")
    weights = read_metadata(path).get("sgm.weights", "as stored")
    if not use_ema and weights == "ema":
        raise SampleInputError(f"--raw: {path} was exported with EMA weights; sample the training .ckpt with --raw")
    config = model_config or _infer_config(layout, path)
    missing = [p for p in PARTS if p not in present]
    if missing and pretrained is None:
        print(f"[sgm] note: {path} holds no {', '.join(missing)}; they come from the model config's random "
              "initialisation (pass --pretrained FILE for trained ones)", flush=True)  # fmt: skip
    model = _build(config, from_files=not missing or pretrained is not None)
    load_checkpoint(model, path, parts=sorted(present, key=PARTS.index))
    if missing and pretrained is not None:
        load_pretrained(model, pretrained, missing)
    info = {"checkpoint": str(path.absolute()), "sha256": file_sha256(path), "model": str(config), "weights": weights}
    info["pretrained"] = _file_info(pretrained) if missing and pretrained else None
    return SamplingModel(model, DiscreteDenoiser(EpsScaling()), info)


def _infer_config(layout: dict[str, tuple[int, ...]], path: Path) -> str:
    """The one shipped model config whose official layout the file's tensors equal."""
    names = sorted({match.split(" (")[0] for match in match_file(layout)})
    if len(names) == 1:
        return names[0]
    found = f"matches several model configs ({', '.join(names)})" if names else "matches no shipped model config"
    raise SampleInputError(f"{path} {found}; pass --model NAME or a .yaml path (`python -m sgm.inspect {path}`)")


def _load_training(path: Path, model_config: str | None, use_ema: bool, pretrained: str | None) -> SamplingModel:
    try:
        checkpoint = load_training_checkpoint(path)
        unet_state, is_ema = unet_state_from_checkpoint(checkpoint, use_ema)
    except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as error:
        raise SampleInputError(f"cannot read {path} as a training checkpoint: {error}") from None
    run_config_path = path.parent.parent / "config.yaml"
    run = OmegaConf.load(run_config_path) if run_config_path.is_file() else OmegaConf.create({})
    config = model_config or run.get("model")
    if config is None:
        raise SampleInputError(
            f"cannot tell which model {path} holds: its run's {run_config_path} is missing; pass --model NAME"
        )
    from_pretrained = None  # the parts the run loaded from its pretrained file (None: all)
    if pretrained is None:
        pretrained, from_pretrained = run.get("pretrained"), run.get("pretrained_parts")
    frozen_parts = [p for p in (from_pretrained or PARTS) if p != "unet"] if pretrained else []
    stored = {part: {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
              for part, prefix in FROZEN.items()}  # fmt: skip
    seed = int(run.get("seed", 0))
    all_from_files = {"text_encoders", "vae"} <= set(frozen_parts) or all(stored.values())
    model = _build(config, from_files=all_from_files, seed=seed)
    name = _name(config, run_config_path)
    try:
        model.unet.load_state_dict(unet_state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        raise SampleInputError(
            f"the UNet in {path} does not fit model config {name}: {' '.join(first)} ...; pass the run's --model"
        ) from None
    if frozen_parts:
        load_pretrained(model, pretrained, frozen_parts)
    for part, state in stored.items():
        if state:  # a run with save_frozen_parts=true
            getattr(model, part).load_state_dict(state, strict=True)
    denoiser = instantiate(run.module.denoiser) if run.get("module") else DiscreteDenoiser(EpsScaling())
    info = {"checkpoint": str(path.absolute()), "sha256": checkpoint_sha256(path),
            "model": name, "weights": "ema" if is_ema else "raw", "global_step": checkpoint.get("global_step"),
            "pretrained": {**_file_info(pretrained), "parts": frozen_parts} if frozen_parts else None, "seed": seed}  # fmt: skip
    if use_ema and not is_ema:
        print(f"[sgm] note: {path} has no EMA weights; sampling its raw weights", flush=True)
    return SamplingModel(model, denoiser, info)


def _build(config: str | DictConfig, from_files: bool, seed: int = 0) -> SDXL:
    """Build on meta when files fill every tensor (skips a multi-second random init), else seeded on CPU."""
    if from_files:
        return build_model(config, device="meta").to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config)


def _name(config: str | DictConfig, run_config_path: Path | None = None) -> str:
    """A model config's name: as given, the shipped config the run's model equals, or the run config's path."""
    if isinstance(config, str):
        return config
    shipped = next((name for name in shipped_model_configs() if load_model_config(name) == config), None)
    return shipped or f"{run_config_path}:model"


def _file_info(path: str | os.PathLike) -> dict[str, str]:
    return {"path": str(Path(path).absolute()), "sha256": file_sha256(path)}

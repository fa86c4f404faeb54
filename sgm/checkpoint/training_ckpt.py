"""The trained weights in a training checkpoint (a Lightning `.ckpt` file or a sharded directory).

A training checkpoint holds the groups the run trains under their module keys (`model.unet.*`), their
EMA under `ema.model.*` (older checkpoints: `ema.shadow.*` for the UNet) and Lightning's own entries.
Reading a sharded (DeepSpeed) directory is the parallelism seam's job (`sgm.parallel`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from torch import Tensor

from sgm.parallel import is_sharded_checkpoint, read_training_checkpoint

MODEL_PREFIX = "model."  # where the training module holds the SDXL model
ADAPTER_PREFIX = "adapters."  # where it holds LoRA adapters: adapters.<kohya name>.lora_down.weight ...
EMA_PREFIX = "ema."  # the EMA of a trained weight: "ema." + its module key
LEGACY_EMA_PREFIX = "ema.shadow."  # earlier checkpoints: the UNet-only EMA, "ema.shadow.<unet key>"
WEIGHTS = ("ema", "raw")


class TrainingCheckpointError(ValueError):
    """A path that is not a readable training checkpoint of this project."""


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """A `.ckpt` file or a sharded checkpoint directory."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".ckpt") or is_sharded_checkpoint(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint as Lightning's dict ("state_dict", "global_step", ...), one clear error otherwise."""
    try:
        checkpoint = read_training_checkpoint(path)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as error:
        raise TrainingCheckpointError(f"cannot read {path} as a training checkpoint: {error}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise TrainingCheckpointError(f"{path} is not a Lightning training checkpoint (no 'state_dict')")
    return checkpoint


def upgrade_legacy_ema(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with an earlier checkpoint's "ema.shadow.<unet key>" entries under "ema.model.unet.<key>"."""
    return {
        f"{EMA_PREFIX}{MODEL_PREFIX}unet.{k[len(LEGACY_EMA_PREFIX) :]}" if k.startswith(LEGACY_EMA_PREFIX) else k: v
        for k, v in state.items()
    }


def trained_weights(checkpoint: dict[str, Any], weights: str = "ema") -> tuple[dict[str, Tensor], str]:
    """Model-relative keys ("unet.x") -> tensors of the groups the run trained, and which weights they are.

    weights="ema" takes the EMA where the checkpoint has one (buffers and anything outside the EMA
    stay raw) and says "raw" when it has none; weights="raw" always takes the trained weights."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    state = checkpoint["state_dict"]
    raw = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not raw and any(k.startswith(ADAPTER_PREFIX) for k in state):
        return {}, weights if weights == "raw" else ("ema" if any(k.startswith(EMA_PREFIX) for k in state) else "raw")
    if not raw:
        raise TrainingCheckpointError(
            "the checkpoint holds no 'model.*' weights; is it a training checkpoint of this project?"
        )
    averaged = EMA_PREFIX + MODEL_PREFIX
    ema = {k[len(averaged) :]: v for k, v in upgrade_legacy_ema(state).items() if k.startswith(averaged)}
    if weights == "ema" and ema:
        return {**raw, **{k: v for k, v in ema.items() if k in raw}}, "ema"
    return raw, "raw"


def trained_adapters(checkpoint: dict[str, Any], weights: str = "ema") -> dict[str, Tensor]:
    """The checkpoint's LoRA adapters as a kohya state dict (`<name>.lora_down.weight`, `.lora_up.weight`,
    `.alpha`), their EMA where asked and present; {} when the run trained no adapters."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    state = checkpoint["state_dict"]
    adapters = {k[len(ADAPTER_PREFIX) :]: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
    averaged = EMA_PREFIX + ADAPTER_PREFIX
    ema = {k[len(averaged) :]: v for k, v in state.items() if k.startswith(averaged)}
    if weights == "ema" and ema:
        adapters.update({k: v for k, v in ema.items() if k in adapters})
    return adapters

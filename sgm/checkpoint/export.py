"""Write any model source as one official-layout .safetensors file that other tools load right.

The file holds the chosen parts under the released files' keys, the `v_pred` marker for a v-prediction
model (what ComfyUI and kohya's scripts read to pick the parametrization; the project's loader reads it
back), and metadata: which weights (EMA or raw), the step, the prediction type (also as modelspec's
`modelspec.prediction_type`), the model config's name, with the VAE its latent scale factor, and the caption
dropout rate of a model trained with one (sampling then guides against the empty caption, as from the run).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sgm.checkpoint.io import CAPTION_DROPOUT_KEY, SCALE_FACTOR_KEY, save_checkpoint
from sgm.checkpoint.model_source import LoadedModel, load_model
from sgm.checkpoint.official_layout import PARTS, V_PRED_KEY, check_parts

MODELSPEC_PREDICTION = {"v": "v", "eps": "epsilon"}


def export_loaded(
    loaded: LoadedModel, out_path: str | os.PathLike, parts: Iterable[str] = PARTS, dtype: torch.dtype | None = None
) -> Path:
    """Save a loaded model's parts with the markers and metadata other loaders need."""
    parts = check_parts(parts)
    info = loaded.info
    extra = {V_PRED_KEY: torch.zeros(0)} if loaded.prediction == "v" else {}
    metadata = {
        "sgm.weights": str(info.get("weights", "")),
        "sgm.global_step": "" if info.get("global_step") is None else str(info["global_step"]),
        "sgm.model": str(info.get("model", "")),
        "sgm.prediction": loaded.prediction,
        "modelspec.prediction_type": MODELSPEC_PREDICTION[loaded.prediction],
    }
    if "vae" in parts:  # the latent scale the VAE was trained with (a VAE trained here has its own)
        metadata[SCALE_FACTOR_KEY] = repr(float(loaded.model.scale_factor))
    if loaded.model.conditioner.caption_dropout_rate > 0:  # trained on "" captions: its sampling guides against ""
        metadata[CAPTION_DROPOUT_KEY] = repr(float(loaded.model.conditioner.caption_dropout_rate))
    return save_checkpoint(loaded.model, out_path, parts=parts, dtype=dtype, metadata=metadata, extra_tensors=extra)


def export_model(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    weights: str = "ema",
    dtype: torch.dtype | None = None,
    parts: Iterable[str] = PARTS,
    pretrained: str | os.PathLike | None = None,
    model_config: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Load `source` (run directory, training checkpoint or file) and write it; returns {"path", "weights", "parts"}.

    model_config: only for a source without a run directory (e.g. a lone checkpoint's UNet)."""
    parts = check_parts(parts)
    loaded = load_model(source, parts=parts, weights=weights, pretrained=pretrained, model_config=model_config)
    path = export_loaded(loaded, out_path, parts, dtype)
    return {"path": str(path), "weights": loaded.info["weights"], "parts": list(parts), "prediction": loaded.prediction}


def export_adapter(
    checkpoint: str | os.PathLike, out_path: str | os.PathLike, weights: str = "ema", dtype: torch.dtype | None = None
) -> dict[str, Any] | None:
    """Write the LoRA adapters a run trained (its training checkpoint `checkpoint`) as one kohya .safetensors
    file that ComfyUI, A1111/Forge and diffusers load, with the base model's fingerprints (the run's
    lineage), the step and the training config as metadata; None when the run trained no adapters."""
    from omegaconf import OmegaConf

    from sgm.checkpoint.kohya import network_from_state, save_lora_file
    from sgm.checkpoint.lineage import read_lineage
    from sgm.checkpoint.model_source import RUN_CONFIG, run_dir_of
    from sgm.checkpoint.training_ckpt import read_checkpoint, trained_adapters
    from sgm.models.build import build_model

    saved = read_checkpoint(checkpoint)
    adapters = trained_adapters(saved, weights)
    if not adapters:
        return None
    run_dir = run_dir_of(Path(checkpoint))
    if run_dir is None:
        raise ValueError(f"{checkpoint} is not inside its run directory: its model config is unknown")
    run = OmegaConf.load(run_dir / RUN_CONFIG)
    network = network_from_state(build_model(run.model, device="meta"), adapters, str(checkpoint))
    lineage = read_lineage(run_dir) or {}
    trainable = OmegaConf.to_container(run.module.get("trainable") or {}, resolve=True)
    metadata = {
        "sgm.config": {k: (v or {}).get("lora") for k, v in trainable.items() if (v or {}).get("mode") == "lora"},
        "sgm.base_fingerprint": lineage.get("weights_at_start", {}),
        "sgm.base_model": str(run.get("pretrained") or "initialised from the run's seed"),
        "sgm.steps": int(saved.get("global_step") or 0),
        "sgm.weights": "ema"
        if weights == "ema" and any(k.startswith("ema.adapters.") for k in saved["state_dict"])
        else "raw",
        "sgm.training_config": OmegaConf.to_yaml(run),
    }
    path = save_lora_file(network, out_path, metadata, dtype=dtype)
    return {"path": str(path), "weights": metadata["sgm.weights"], "modules": len(network)}

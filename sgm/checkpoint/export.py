"""Write any model source as one official-layout .safetensors file that other tools load right.

The file holds the chosen parts under the released files' keys, the `v_pred` marker for a v-prediction
model (what ComfyUI and kohya's scripts read to pick the parametrization; the project's loader reads it
back), and metadata: which weights (EMA or raw), the step, the prediction type (also as modelspec's
`modelspec.prediction_type`), the model config's name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sgm.checkpoint.io import save_checkpoint
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

"""The settings `python -m sgm.sample` writes into each PNG: JSON under "sgm", a readable "parameters".

The JSON uses the project's names (`original_size_as_tuple` (h, w), `crop_coords_top_left`
(top, left), `target_size_as_tuple` (h, w), `aesthetic_score`) and records each checkpoint with its
sha256, so an image says exactly what made it; `read_settings` gives it back.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from sgm.checkpoint.fingerprints import file_sha256, path_sha256
from sgm.checkpoint.io import atomic_write
from sgm.checkpoint.model_source import LoadedModel

SAMPLER_NAMES = {"euler": "Euler EDM", "dpmpp2m": "DPM++ 2M"}
SETTINGS_KEY = "sgm"


def with_hashes(info: dict[str, Any]) -> dict[str, Any]:
    """A loaded model's provenance with the sha256 of its checkpoint (file or sharded directory) and of the
    pretrained file that supplied parts: what an image records about the weights that made it."""
    out = {**info, "sha256": path_sha256(info["checkpoint"])}
    if info.get("pretrained"):
        out["pretrained"] = {**info["pretrained"], "sha256": file_sha256(info["pretrained"]["path"])}
    return out


def lora_info(path: str | os.PathLike, scale: float) -> dict[str, Any]:
    """A LoRA applied to the base model as an image records it: path, scale and sha256 (as with_hashes)."""
    return {"path": str(Path(path).absolute()), "scale": float(scale), "sha256": file_sha256(path)}


def settings(
    args: Namespace,
    base: LoadedModel,
    refiner: LoadedModel | None,
    dtype: str,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
) -> dict[str, Any]:
    """What every image of this run shares (the per-image prompt, seed and index are added later).
    loras: the (file, scale) adapters applied to the base model, in order."""
    size = [args.height, args.width]
    out = {
        "negative_prompt": args.negative_prompt,
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "height": args.height,
        "width": args.width,
        "original_size_as_tuple": list(args.original_size or size),
        "crop_coords_top_left": list(args.crop_top_left),
        "target_size_as_tuple": list(args.target_size or size),
        "dtype": dtype,
        "base": with_hashes(base.info),
        "loras": [lora_info(path, scale) for path, scale in loras],
        "refiner": None,
    }
    uses_aesthetic = any(m is not None and "aesthetic_score" in m.model.conditioner.input_keys for m in (base, refiner))
    if uses_aesthetic:
        out["aesthetic_score"], out["negative_aesthetic_score"] = args.aesthetic_score, args.negative_aesthetic_score
    if refiner is not None:
        out["refiner"] = {**with_hashes(refiner.info), "strength": args.refiner_strength}
    return out


def parameters_text(meta: dict[str, Any]) -> str:
    """The readable summary (the "parameters" layout other SD tools show): prompt, negative, settings."""
    fields = [
        ("Steps", meta["steps"]),
        ("Sampler", SAMPLER_NAMES[meta["sampler"]]),
        ("CFG scale", meta["guidance_scale"]),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Original size (h, w)", meta["original_size_as_tuple"]),
        ("Crop top-left", meta["crop_coords_top_left"]),
        ("Target size (h, w)", meta["target_size_as_tuple"]),
        ("Model", meta["base"]["model"]),
        ("Model hash", meta["base"]["sha256"][:10]),
        ("Weights", meta["base"]["weights"]),
    ]
    for lora in meta.get("loras") or ():
        fields.append(("LoRA", f"{Path(lora['path']).stem}:{lora['scale']:g} ({lora['sha256'][:10]})"))
    if meta["refiner"]:
        fields += [
            ("Refiner", meta["refiner"]["model"]),
            ("Refiner hash", meta["refiner"]["sha256"][:10]),
            ("Refiner strength", meta["refiner"]["strength"]),
        ]
    if "aesthetic_score" in meta:
        fields += [
            ("Aesthetic score", meta["aesthetic_score"]),
            ("Negative aesthetic score", meta["negative_aesthetic_score"]),
        ]
    negative = f"\nNegative prompt: {meta['negative_prompt']}" if meta["negative_prompt"] else ""
    return meta["prompt"] + negative + "\n" + ", ".join(f"{k}: {v}" for k, v in fields)


def save_png(image: Image.Image, path: Path, texts: dict[str, str]) -> Path:
    """Write a PNG with text chunks, atomically (an interrupted run leaves no half image)."""
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    path.chmod(0o644)  # the temporary file was private (mkstemp); images are for sharing
    return path


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings JSON of a PNG written by `python -m sgm.sample`."""
    with Image.open(path) as image:
        text = image.text.get(SETTINGS_KEY)
    if text is None:
        raise ValueError(f"{path} has no '{SETTINGS_KEY}' text chunk; it was not written by python -m sgm.sample")
    return json.loads(text)

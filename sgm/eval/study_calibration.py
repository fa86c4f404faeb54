"""What the conditioning study's models could reproduce, and how much they learned to use it.

Two measurements on training crops drawn through the study's own loader (the same buckets, random
crops and recorded micro-conditioning the models were trained on):

- `data_reference`: the sample measures (border cut, edge sharpness) on the crops themselves and on
  their round trip through the study VAE, split by the crop and the original size that were recorded
  with them. A model that learned crop conditioning would, at crop (0, 0), approach the cut fraction of
  the crops recorded there; one that learned size conditioning would span the VAE's sharpness range.
- `conditioning_use`: how much a trained model's denoising error on the crops rises when one
  micro-conditioning value is swapped between the batch's images (the same latents and noise, each
  image given another image's value). Near zero means the network ignores that input, whatever its
  samples look like; the caption swap is the yardstick of a conditioning the model did learn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgm.eval.conditioning_metrics import analyse
from sgm.eval.study_report import sharpness_stats
from sgm.inference import latents_to_uint8
from sgm.training.module import pixels_to_unit_range

SWAPPED_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "txt")  # txt: the yardstick
NON_CONDITION_KEYS = ("jpg", "__key__")


def training_crops(loader: Any, count: int) -> list[dict[str, Any]]:
    """At least `count` training images as the loader's batches (epoch after epoch if needed)."""
    batches, drawn = [], 0
    while drawn < count:
        before = drawn
        for batch in loader:
            batches.append(batch)
            drawn += len(batch["jpg"])
            if drawn >= count:
                break
        if drawn == before:
            raise ValueError("the study's data config yields no batches: check data.shards")
    return batches


def size_bins(sizes: Sequence[int]) -> list[tuple[int, int | None]]:
    """Original short-side intervals [lo, hi) cut at the study's size conditions; the last is open."""
    edges = [0, *sorted(sizes)[:-1]]
    return [(lo, hi) for lo, hi in zip(edges, [*edges[1:], None])]


def _bin_label(lo: int, hi: int | None) -> str:
    return f"{lo}-{hi - 1}" if hi is not None else f">= {lo}"


def _fraction(flags: Sequence[bool]) -> dict[str, Any]:
    return {"count": len(flags), "cut": int(sum(flags)), "fraction": (sum(flags) / len(flags)) if flags else None}


def _crop_rows(batch: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]]:
    """(image H x W x 3, original size, crop) for each image of one loader batch."""
    images = batch["jpg"].permute(0, 2, 3, 1).numpy()
    sizes, crops = batch["original_size_as_tuple"].tolist(), batch["crop_coords_top_left"].tolist()
    return zip(images, map(tuple, sizes), map(tuple, crops))


def summarise_measures(
    measures: Sequence[Mapping[str, Any]],
    short_sides: Sequence[int],
    at_origin: Sequence[bool],
    sizes: Sequence[int],
    square: Sequence[bool] = (),
) -> dict[str, Any]:
    """Cut fractions at crop (0, 0) / elsewhere / from square originals (which a square crop never cuts into:
    what the study's reference condition asks for) and mean edge sharpness per original short-side bin."""
    cut = [bool(m["cut_sides"]) for m in measures]
    sharpness = []
    for lo, hi in size_bins(sizes):
        in_bin = [m for m, side in zip(measures, short_sides) if side >= lo and (hi is None or side < hi)]
        mean, se, count = sharpness_stats({"samples": in_bin})
        sharpness.append({"short_side": _bin_label(lo, hi), "count": count, "mean": mean, "se": se})
    return {
        "cut_at_origin": _fraction([c for c, o in zip(cut, at_origin) if o]),
        "cut_elsewhere": _fraction([c for c, o in zip(cut, at_origin) if not o]),
        "cut_all": _fraction(cut),
        "cut_square_original": _fraction([c for c, q in zip(cut, square) if q]),
        "sharpness_by_short_side": sharpness,
    }


@torch.no_grad()
def data_reference(model: Any, batches: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """The sample measures on the training crops ("crops") and on their VAE round trip ("through_vae")."""
    raw, decoded, short_sides, at_origin, square = [], [], [], [], []
    for batch in batches:
        latents = model.encode_first_stage(pixels_to_unit_range(batch["jpg"]).float(), sample=False)
        round_trip = latents_to_uint8(model, latents).numpy()
        for (image, size, crop), again in zip(_crop_rows(batch), round_trip):
            raw.append(analyse(image))
            decoded.append(analyse(again))
            short_sides.append(min(size))
            at_origin.append(crop == (0, 0))
            square.append(size[0] == size[1])
    return {
        "images": len(raw),
        "crops": summarise_measures(raw, short_sides, at_origin, sizes, square),
        "through_vae": summarise_measures(decoded, short_sides, at_origin, sizes, square),
    }


def _swapped(batch: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The batch with `key`'s values rolled by one image (each image gets its neighbour's value)."""
    values = batch[key]
    rolled = torch.roll(values, 1, 0) if isinstance(values, Tensor) else [values[-1], *values[:-1]]
    return {**batch, key: rolled}


@torch.no_grad()
def conditioning_use(
    sampling_model: Any, batches: Sequence[Mapping[str, Any]], sigmas: Sequence[float], seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Relative rise of the denoising error (x0 MSE, EMA weights) when one conditioning input is swapped
    between images, per noise level: {key: {str(sigma): {"rise", "se"}}} for the keys the model reads."""
    model, denoiser = sampling_model.model, sampling_model.denoiser
    keys = [k for k in SWAPPED_KEYS if k in model.conditioner.input_keys]
    generator = torch.Generator().manual_seed(seed)
    errors: dict[str, dict[float, list[Tensor]]] = {k: {s: [] for s in sigmas} for k in ("true", *keys)}
    for batch in batches:
        if len(batch["jpg"]) < 2:
            continue
        latents = model.encode_first_stage(pixels_to_unit_range(batch["jpg"]).float(), sample=False)
        plain = {k: v for k, v in batch.items() if k not in NON_CONDITION_KEYS}
        conds = {"true": model.condition(plain), **{k: model.condition(_swapped(plain, k)) for k in keys}}
        for sigma in sigmas:
            noisy = latents + sigma * torch.randn(latents.shape, generator=generator)
            levels = torch.full((latents.shape[0],), float(sigma))
            for name, cond in conds.items():
                denoised = denoiser(model.unet, noisy, levels, cond)
                errors[name][sigma].append((denoised - latents).pow(2).mean(dim=(1, 2, 3)))
    result: dict[str, dict[str, Any]] = {}
    for key in keys:
        result[key] = {}
        for sigma in sigmas:
            true, swapped = torch.cat(errors["true"][sigma]), torch.cat(errors[key][sigma])
            scale = float(true.mean())
            rises = (swapped - true) / scale
            result[key][str(sigma)] = {"rise": float(rises.mean()), "se": float(rises.std() / math.sqrt(len(rises)))}
    return result

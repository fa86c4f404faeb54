"""The conditioning study's outputs: verdicts from its numbers, report.md, samples.png and results.json.

Verdicts compare the measured numbers exactly as the acceptance states them (no thresholds tuned to
the outcome); each also carries the counts and a one-sided two-proportion z-test or the standard
errors, so a reader can tell a clear effect from noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

LABEL_WIDTH = 300
COLOUR_TARGET = 0.9
ALPHA = 0.05  # an effect in the right direction counts as shown only at p < ALPHA (else "direction only")
# (model with crop conditioning, the same model without it, what the pair isolates)
CROP_COMPARISONS = (
    ("no_size", "none", "crop conditioning alone"),
    ("full", "no_crop", "crop conditioning on top of size conditioning"),
    ("full", "none", "size and crop conditioning"),
)


def _height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """An original size as (h, w); a single number is a square one (results written before wide ones)."""
    return (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))


def shift_original(settings: Mapping[str, Any]) -> tuple[int, int]:
    """The original size (h, w) of the study's crop sweep (results written before it had one: the square reference)."""
    return _height_width(settings.get("shift_original", settings["reference_size"]))


def find(
    conditions: Sequence[Mapping[str, Any]], variant: str, size: int | Sequence[int], crop: Sequence[int]
) -> Mapping | None:
    """The scored condition with these values (size: square side or (h, w)), if the study sampled it."""
    for condition in conditions:
        if (
            condition["variant"] == variant
            and _height_width(condition["original_size"]) == _height_width(size)
            and list(condition["crop"]) == list(crop)
        ):
            return condition
    return None


def one_sided_p(cut_a: int, n_a: int, cut_b: int, n_b: int) -> float:
    """P-value of "a's proportion is lower than b's" (pooled two-proportion z-test, normal approximation)."""
    pooled = (cut_a + cut_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 1.0
    z = (cut_b / n_b - cut_a / n_a) / spread
    return 0.5 * math.erfc(z / math.sqrt(2))


def status(direction: bool, p: float) -> str:
    """The verdict's word: the effect's direction and whether it is more than noise."""
    if not direction:
        return "NOT shown"
    return "shown" if p < ALPHA else f"direction only (p >= {ALPHA}: within noise)"


def sample_sharpness(sample: Mapping[str, Any]) -> float:
    return sample["sharpness"] if sample["object_found"] else math.nan


def sample_centre_x(sample: Mapping[str, Any]) -> float:
    """The object's horizontal centre as a fraction of the width (NaN without an object)."""
    return sample["centre_yx"][1] if sample["object_found"] and sample.get("centre_yx") else math.nan


def paired_rise_p(
    lower: Mapping[str, Any],
    higher: Mapping[str, Any],
    measure: Callable[[Mapping[str, Any]], float] = sample_sharpness,
) -> tuple[float, float]:
    """Mean rise of `measure` (default: edge sharpness) from `lower` to `higher` over samples with the same
    prompt and seed (the conditions share them), and its one-sided p-value (normal approximation of the
    paired mean). Pairs where either side has no value (NaN) are left out."""
    pairs = [(measure(a), measure(b)) for a, b in zip(lower["samples"], higher["samples"])]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 2:
        return math.nan, 1.0
    rises = np.asarray([b - a for a, b in pairs])
    spread = float(rises.std(ddof=1) / math.sqrt(len(rises)))
    mean = float(rises.mean())
    if spread == 0:
        return mean, 0.0 if mean > 0 else 1.0
    return mean, 0.5 * math.erfc(mean / spread / math.sqrt(2))


def sharpness_stats(condition: Mapping[str, Any]) -> tuple[float | None, float | None, int]:
    """Mean edge sharpness, its standard error and the number of samples it is over."""
    values = [v for v in map(sample_sharpness, condition["samples"]) if math.isfinite(v)]
    if not values:
        return None, None, 0
    spread = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), spread, len(values)


def side_cut_fraction(condition: Mapping[str, Any], side: str) -> float:
    """Share of the condition's samples whose object the frame cuts on `side`."""
    samples = condition["samples"]
    return sum(side in s["cut_sides"] for s in samples) / len(samples)


def crop_verdicts(conditions: Sequence[Mapping[str, Any]], ref: int) -> list[dict]:
    """Border cut at crop (0, 0) (square original `ref`) with crop conditioning vs the model trained without it."""
    verdicts = []
    for variant, baseline_variant, what in CROP_COMPARISONS:
        ours, baseline = find(conditions, variant, ref, (0, 0)), find(conditions, baseline_variant, ref, (0, 0))
        if ours is None or baseline is None:
            continue
        n_a, n_b = ours["count"], baseline["count"]
        cut_a, cut_b = round(ours["border_cut_fraction"] * n_a), round(baseline["border_cut_fraction"] * n_b)
        p = one_sided_p(cut_a, n_a, cut_b, n_b)
        verdicts.append(
            {
                "effect": f"{what}: fewer objects cut at crop (0,0) ({variant} vs {baseline_variant})",
                "status": status(cut_a / n_a < cut_b / n_b, p),
                "numbers": f"{cut_a}/{n_a} = {cut_a / n_a:.1%} vs {cut_b}/{n_b} = {cut_b / n_b:.1%} (one-sided p = {p:.2g})",
            }
        )
    return verdicts


def mean_centre_x(condition: Mapping[str, Any]) -> float | None:
    values = [x for x in map(sample_centre_x, condition["samples"]) if math.isfinite(x)]
    return float(np.mean(values)) if values else None


def shift_verdicts(
    conditions: Sequence[Mapping[str, Any]], original: Sequence[int], crops: Sequence[Sequence[int]]
) -> list[dict]:
    """Other crop values shift the framing: at a wide original, a larger crop_left (more of the image cut
    away on the left) moves the object to the left, paired by prompt and seed, for each crop-conditioned model."""
    lefts = sorted({int(crop[1]) for crop in crops if int(crop[0]) == 0})
    verdicts = []
    for variant in ("full", "no_size"):
        found = [(left, c) for left in lefts if (c := find(conditions, variant, original, (0, left)))]
        if len(found) < 2:
            continue
        falls = [paired_rise_p(later, earlier, sample_centre_x) for (_, earlier), (_, later) in pairwise(found)]
        centres = ", ".join(
            f"{left}: {x:.2f}" if (x := mean_centre_x(c)) is not None else f"{left}: n/a" for left, c in found
        )
        verdicts.append(
            {
                "effect": (
                    f"crop_left {' -> '.join(str(left) for left, _ in found)} at original "
                    f"{original[0]}x{original[1]} shifts the framing: the object moves left ({variant})"
                ),
                "status": status(all(fall > 0 for fall, _ in falls), max(p for _, p in falls)),
                "numbers": f"mean object centre x (fraction of the width) {centres}; paired moves "
                + ", ".join(f"{-fall:+.2f} (p = {p:.2g})" for fall, p in falls),
            }
        )
    return verdicts


def size_verdicts(conditions: Sequence[Mapping[str, Any]], sizes: Sequence[int], resolution: int) -> list[dict]:
    """Sharpness rising with the size condition, for each model that has size conditioning.

    The verdict is over the sizes up to the training resolution: training images that small were
    upscaled, by more the smaller they were; larger ones were all downscaled (sharp), so above the
    resolution no further rise is expected and those sizes are listed but not judged."""
    verdicts = []
    for variant in ("full", "no_crop"):
        found = [(size, c) for size in sizes if (c := find(conditions, variant, size, (0, 0)))]
        stats = [(size, *sharpness_stats(c)) for size, c in found]
        judged = [c for (size, c), (_, mean, _, _) in zip(found, stats) if size <= resolution]
        if len(judged) < 2 or any(mean is None for size, mean, _, _ in stats if size <= resolution):
            continue
        steps = [paired_rise_p(a, b) for a, b in pairwise(judged)]
        verdicts.append(
            {
                "effect": f"sharpness rises monotonically with the size condition up to {resolution} px ({variant})",
                "status": status(all(rise > 0 for rise, _ in steps), max(p for _, p in steps)),
                "numbers": ", ".join(
                    f"{size}: {mean:.3f} ± {se or 0:.3f}" + (" (not judged)" if size > resolution else "")
                    for size, mean, se, _ in stats
                    if mean is not None
                )
                + "; paired rises "
                + ", ".join(f"{rise:+.3f} (p = {p:.2g})" for rise, p in steps),
            }
        )
    return verdicts


def colour_verdicts(conditions: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Colour named in the prompt, over every sample of each variant."""
    verdicts = []
    for variant in dict.fromkeys(c["variant"] for c in conditions):
        own = [c for c in conditions if c["variant"] == variant]
        total = sum(c["count"] for c in own)
        if not total:
            continue
        right = sum(round(c["colour_accuracy"] * c["count"]) for c in own)
        shapes = sum(round((c["shape_accuracy"] or 0) * c["count"]) for c in own)
        verdicts.append(
            {
                "effect": f"prompt adherence on colour >= {COLOUR_TARGET:.0%} ({variant}, all its samples)",
                "status": "shown" if right / total >= COLOUR_TARGET else "NOT shown",
                "numbers": f"colour {right}/{total} = {right / total:.1%}; shape {shapes}/{total} = {shapes / total:.1%}",
            }
        )
    return verdicts


def all_verdicts(record: Mapping[str, Any]) -> list[dict]:
    """Every verdict, each {"effect", "status", "numbers", "shown"} ("shown": status == "shown")."""
    settings, conditions = record["settings"], record["conditions_with_samples"]
    shifts = shift_verdicts(conditions, shift_original(settings), settings["crops"])
    verdicts = [
        *crop_verdicts(conditions, settings["reference_size"]),
        *shifts,
        *size_verdicts(conditions, settings["sizes"], settings["resolution"]),
        *colour_verdicts(conditions),
    ]
    return [{**v, "shown": v["status"] == "shown"} for v in verdicts]


def sample_figure(images: Mapping[str, np.ndarray], seeds_per_prompt: int) -> Image.Image:
    """One row per condition: its label, then the first seed's sample of every prompt."""
    rows = []
    for label, stack in images.items():
        picks = stack[::seeds_per_prompt]
        height, width = picks.shape[1:3]
        row = Image.new("RGB", (LABEL_WIDTH + width * len(picks), height), "white")
        ImageDraw.Draw(row).text((6, height // 2 - 6), label, fill="black")
        for index, image in enumerate(picks):
            row.paste(Image.fromarray(image), (LABEL_WIDTH + index * width, 0))
        rows.append(row)
    figure = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 2 for r in rows)), "white")
    top = 0
    for row in rows:
        figure.paste(row, (0, top))
        top += row.height + 2
    return figure


def _table(conditions: Sequence[Mapping[str, Any]]) -> list[str]:
    header = (
        "| condition | samples | no object | border cut | cut top / left / right | object centre x | "
        "edge sharpness (± s.e.) | colour | shape |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for c in conditions:
        mean, se, _ = sharpness_stats(c)
        sharp = f"{mean:.3f} ± {se or 0:.3f}" if mean is not None else "n/a"
        sides = " / ".join(f"{side_cut_fraction(c, side):.1%}" for side in ("top", "left", "right"))
        centre = mean_centre_x(c)
        lines.append(
            f"| {c['label']} | {c['count']} | {c['no_object']} | {c['border_cut_fraction']:.1%} | {sides} | "
            f"{'n/a' if centre is None else f'{centre:.2f}'} | {sharp} | "
            f"{c['colour_accuracy']:.1%} | {(c['shape_accuracy'] or 0):.1%} |"
        )
    return lines


def _predictions(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """What the runs' networks predict, read from their saved configs ("v-prediction", "eps-prediction")."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    kinds = {
        get_class(OmegaConf.load(Path(r["config"])).module.denoiser.scaling._target_).prediction for r in runs.values()
    }
    return " / ".join(f"{kind}-prediction" for kind in sorted(kinds))


USE_NAMES = {"original_size_as_tuple": "original size", "crop_coords_top_left": "crop", "txt": "caption (yardstick)"}


def _share(part: Mapping[str, Any]) -> str:
    return f"{part['fraction']:.1%} ({part['cut']}/{part['count']})" if part["count"] else "n/a"


def calibration_lines(calibration: Mapping[str, Any] | None) -> list[str]:
    """The report's calibration section: what the training crops show, and how much each model uses
    each conditioning input (study_calibration.py)."""
    if not calibration:
        return []
    data, use = calibration["data"], calibration["conditioning_use"]
    crops, vae = data["crops"], data["through_vae"]
    lines = [
        "## Calibration: what the training data shows, and what the models learned",
        "",
        (
            f"{data['images']} training crops drawn through the study's own loader (another data seed), measured "
            "as the samples are, as they are and after a round trip through the study VAE. A model that learned "
            "size and crop conditioning would approach, at a square original and crop (0,0), the cut fraction of "
            "the crops from square originals (a square crop of a square image cuts nothing away); one that "
            "learned size conditioning would span the round-tripped sharpness range."
        ),
        "",
        "| training crops | cut at crop (0,0) | cut at other crops | from square originals | all |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {_share(d['cut_at_origin'])} | {_share(d['cut_elsewhere'])} | "
            f"{_share(d.get('cut_square_original', {'count': 0}))} | {_share(d['cut_all'])} |"
            for name, d in (("as loaded", crops), ("through the VAE", vae))
        ],
        "",
        "| original short side (px) | images | edge sharpness as loaded | through the VAE |",
        "|---|---|---|---|",
    ]
    for raw, again in zip(crops["sharpness_by_short_side"], vae["sharpness_by_short_side"]):
        cells = [f"{b['mean']:.3f} ± {b['se'] or 0:.3f}" if b["mean"] is not None else "n/a" for b in (raw, again)]
        lines.append(f"| {raw['short_side']} | {raw['count']} | {cells[0]} | {cells[1]} |")
    sigmas = sorted({sigma for per_key in use.values() for levels in per_key.values() for sigma in levels}, key=float)
    lines += [
        "",
        (
            f"Conditioning use: the rise of each model's denoising error (x0 MSE, EMA weights) on "
            f"{calibration['use_images']} of these crops when one input is swapped between images (same latents and "
            "noise); about 0 means the network ignores that input. The caption swap is the yardstick of a "
            "conditioning that was learned."
        ),
        "",
        "| model | swapped input | " + " | ".join(f"sigma {s}" for s in sigmas) + " |",
        "|---|---|" + "---|" * len(sigmas),
    ]
    for variant, per_key in use.items():
        for key, levels in per_key.items():
            cells = [f"{levels[s]['rise']:+.2%} ± {levels[s]['se']:.2%}" if s in levels else "n/a" for s in sigmas]
            lines.append(f"| {variant} | {USE_NAMES.get(key, key)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _total_time(record: Mapping[str, Any]) -> str:
    timings, reused = record["timings_seconds"], record.get("reused_steps", [])
    line = (
        f"Total time: {sum(timings.values()) / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})"
    )
    if reused:
        line += (
            f"; {', '.join(reused)} reused from an earlier run in this folder, counted with the time that run recorded"
        )
    return line


def _size_text(settings: Mapping[str, Any]) -> str:
    height, width = shift_original(settings)
    return f"{height}x{width} (h x w)"


def is_quick(record: Mapping[str, Any]) -> bool:
    """Whether the study ran with --quick: its command says so (--report-only rewrites keep it), or it ran in
    code with the --quick preset's step and sample counts."""
    from sgm.eval.conditioning_study import QUICK  # here, not at the top: that module imports this one

    if "--quick" in str(record.get("command", "")).split():
        return True
    settings = record.get("settings") or {}
    return all(settings.get(k) == getattr(QUICK, k) for k in ("train_steps", "vae_steps", "seeds_per_prompt"))


def quick_run_note(record: Mapping[str, Any]) -> list[str]:
    """The report's warning for a --quick run: a few steps of everything check the pipeline and measure nothing,
    so a reader must not take its verdicts as findings."""
    if not is_quick(record):
        return []
    s = record["settings"]
    return [
        f"**A --quick run: a pipeline check, not results.** Its models trained {s['train_steps']} steps (VAE "
        f"{s['vae_steps']}) and each condition has {s['seeds_per_prompt']} sample(s) per prompt, so the verdicts "
        "below only show that every step of the study runs end to end; they say nothing about the effects. "
        "Run `python -m sgm.eval.conditioning_study` without --quick for results.",
        "",
    ]


def markdown(record: Mapping[str, Any], verdicts: Sequence[Mapping[str, Any]]) -> str:
    s, vae = record["settings"], record["vae"]
    runs = record["runs"]
    lines = [
        "# SDXL micro-conditioning study (miniature)",
        "",
        f"Command: `{record['command']}`  ",
        _total_time(record),
        "",
        "## Verdicts",
        "",
        *quick_run_note(record),
        f"An effect in the right direction counts as shown only at one-sided p < {ALPHA}.",
        "",
        *[f"- **{v['status']}**: {v['effect']}: {v['numbers']}" for v in verdicts],
        "",
        "## Setup",
        "",
        (
            f"- Data: {s['num_samples']} synthetic images (data/build_shapes_dataset.py, seed {s['seed']}): one circle, "
            f"square or triangle in red, green, blue or yellow on light grey, framed near the centre; long side "
            f"{s['min_side']}-{s['max_side']} px (log-uniform), nine aspect "
            f"ratios; trained as {s['resolution']}x{s['resolution']} random square crops (small images upscaled)."
        ),
        (
            f"- VAE (f=4, trained first: no released VAE fits a model this small): sgm.training.vae_training, "
            f"{vae['steps']} steps at lr {s['vae_lr']} ({vae['seconds']:.0f} s when it was trained), final L1 per "
            f"pixel {vae['curve'][-1]['l1_per_pixel']:.4f} (images in [-1, 1]), latent scale factor {vae['scale_factor']:.5f}."
        ),
        f"- Diffusion models: `python train.py experiment=conditioning_study/<variant>`, {s['train_steps']} steps "
        f"at batch {s['batch_size']}, lr {s['lr']}, seed {s['seed']}, {_predictions(runs)} (the experiment config says why), "
        f"{s.get('parallel_trainings', 1)} trained at a time, EMA weights sampled: "
        + ", ".join(f"{v} (median {r.get('images_per_second_median', '?')} img/s)" for v, r in runs.items())
        + ".",
        (
            f"- Sampling: DPM++ 2M, {s['sampler_steps']} steps, guidance {s['guidance_scale']} against the empty "
            f"caption, {len(record['prompts'])} prompts x {s['seeds_per_prompt']} seeds (seed = "
            f"{s['seed']} + 1000 x prompt index + seed index) per condition; crop (0, 0) comparisons at original size "
            f"{s['reference_size']}x{s['reference_size']}; crop sweep at original {_size_text(s)}; size conditions "
            f"(square) at crop (0, 0); target size {s['resolution']}x{s['resolution']}."
        ),
        (
            "- Measures (sgm/eval/conditioning_metrics.py): border cut = the object's mask reaches the outermost "
            "row or column; edge sharpness = median edge slope / contrast (about 1 / edge width in px); colour "
            "and shape = nearest named colour / shape prototype vs the prompt. A sample with no object counts as "
            "wrong colour and shape and as not cut."
        ),
        "",
        "## Samples",
        "",
        "![samples](samples.png)",
        "",
        "One row per condition, the first seed of each prompt (prompts in the order of `prompts` in results.json).",
        "",
        "## All conditions",
        "",
        *_table(record["conditions"]),
        "",
        *calibration_lines(record.get("calibration")),
    ]
    return "\n".join(lines) + "\n"


def write_report(out: Path, record: dict[str, Any], images: Mapping[str, np.ndarray]) -> dict[str, Path]:
    """Write results.json, samples.png and report.md under `out`; returns their paths."""
    conditions = [{**c, "samples": record["per_sample"][c["label"]]} for c in record["conditions"]]
    verdicts = all_verdicts({**record, "conditions_with_samples": conditions})
    record["conditions"] = [{**c, "samples": None} for c in conditions]
    record["verdicts"] = verdicts
    paths = {"json": out / "results.json", "figure": out / "samples.png", "report": out / "report.md"}
    sample_figure(images, record["settings"]["seeds_per_prompt"]).save(paths["figure"])
    paths["report"].write_text(markdown({**record, "conditions": conditions}, verdicts))
    paths["json"].write_text(json.dumps(record, indent=1, default=str))
    return paths

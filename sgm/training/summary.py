"""A finished run's closing lines: the evidence that it learned, and what its samples were decoded with.

The held-out loss first -> last (from <run_dir>/validation.jsonl, raw and EMA weights), the last sample grid,
and where the VAE came from (lineage.json): a reader of the console sees at once whether training worked and
whether the grid could show it (a VAE left at its random initialisation decodes anything to coloured noise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sgm.checkpoint.io import SCALE_FACTOR_KEY
from sgm.checkpoint.lineage import FROZEN_FILE, read_lineage
from sgm.checkpoint.model_source import RUN_CONFIG
from sgm.eval.prompt_colours import grid_agreement
from sgm.training.validation import read_validation_log

WEIGHTS_NAMES = {"raw": "raw weights", "ema": "EMA weights"}


def validation_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """'validation loss (raw weights): A at step S -> B at step T (N held-out samples)' per kind of weights."""
    lines = []
    for weights, name in WEIGHTS_NAMES.items():
        own = sorted((r for r in records if r.get("weights") == weights), key=lambda r: int(r["step"]))
        if not own:
            continue
        first, last = own[0], own[-1]
        change = "fell" if last["loss"] < first["loss"] else "did not fall"
        lines.append(
            f"validation loss ({name}): {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step "
            f"{last['step']} ({change}; {last.get('samples', '?')} held-out samples, {len(own)} evaluations)"
        )
    return lines


def vae_line(run_dir: str | os.PathLike) -> str | None:
    """Where the run's VAE weights came from, with its training record when a VAE trainer made it."""
    record = read_lineage(run_dir)
    if record is None:
        return None
    source = (record.get("frozen") or {}).get("vae", {}).get("source")
    if source == "pretrained":
        parent = record.get("parent") or {}
        metadata = parent.get("metadata") or {}
        trained = json.loads(metadata.get("sgm.vae_training", "{}"))
        how = ""
        if trained:
            l1 = (trained.get("curve") or [{}])[-1].get("l1_per_pixel")
            how = f", trained {trained.get('steps')} steps by sgm.training.vae_training" + (
                f" (L1/pixel {l1:.3f})" if l1 is not None else ""
            )
        scale = metadata.get(SCALE_FACTOR_KEY)
        return f"VAE: {parent.get('path')}{how}" + (f", latent scale factor {float(scale):.5f}" if scale else "")
    if source == FROZEN_FILE:
        return (
            f"VAE: initialised from seed {record['frozen']['vae'].get('seed')} and never trained (its samples "
            "decode to coloured noise; start from a file with a trained VAE: pretrained=... pretrained_parts=[vae])"
        )
    return "VAE: trained by this run" if "vae" in (record.get("trained") or []) else None


def grid_colour_line(run_dir: str | os.PathLike, grid: str) -> str | None:
    """How many of the grid's images show the background colour their prompt names (when every prompt names one
    of the demo vocabulary's colours, as the demo's do)."""
    config_path = Path(run_dir) / RUN_CONFIG
    if not config_path.is_file():
        return None
    samples = OmegaConf.load(config_path).samples
    agreement = grid_agreement(grid, list(samples.prompts), int(samples.height), int(samples.width))
    if agreement is None:
        return None
    return (
        f"background colour as prompted in the grid: {agreement.describe()} (the median colour of each image's "
        "border, named by the nearest demo colour)"
    )


def run_summary(run_dir: str | os.PathLike, outputs: Mapping[str, str]) -> list[str]:
    """The closing lines: validation loss first -> last, the sample grid (and whether its images show the background
    colours their prompts name), the VAE (each when the run has it)."""
    lines = validation_lines(read_validation_log(run_dir))
    if outputs.get("samples"):
        lines.append(f"sample grid: {outputs['samples']} (a column per prompt, a row per seed)")
        colours = grid_colour_line(run_dir, outputs["samples"])
        if colours:
            lines.append(colours)
    vae = vae_line(run_dir)
    if vae:
        lines.append(vae)
    return lines

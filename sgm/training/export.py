"""Export a run (or one of its checkpoints) as an official single-file .safetensors.

    python -m sgm.training.export outputs/runs/demo out.safetensors            # the run's newest checkpoint
    python -m sgm.training.export outputs/runs/demo/checkpoints/last.ckpt out.safetensors [--raw] [--fp16] [--unet-only]

With no other flag it writes exactly what the run's own end-of-run export writes (the run's `export:`
settings: EMA or raw, dtype, UNet-only), bit for bit: the trained weights come from the checkpoint (a
`.ckpt` file or a sharded DeepSpeed directory, consolidated in memory), every frozen part from the source
the run recorded in lineage.json, checked against its fingerprint. A v-prediction run's file carries the
`v_pred` marker. An official .safetensors source is rewritten (e.g. to fp16, or UNet-only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sgm.checkpoint.export import export_model
from sgm.checkpoint.io import CheckpointMismatchError
from sgm.checkpoint.model_source import RUN_CONFIG, run_dir_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_export_settings(source: str | Path) -> dict[str, Any]:
    """The `export:` block of the source's run (defaults: EMA, fp32, all parts)."""
    path = Path(source)
    run_dir = path if (path / RUN_CONFIG).is_file() else run_dir_of(path) if path.exists() else None
    settings = {"ema": True, "dtype": "fp32", "unet_only": False}
    if run_dir is not None:
        settings.update(OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG).get("export") or {}))
    return settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sgm.training.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", help="a run directory, a training .ckpt (file or DeepSpeed directory), or a .safetensors"
    )
    parser.add_argument("out", help="the .safetensors file to write")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--raw", dest="ema", action="store_false", default=None, help="the raw weights, not the EMA")
    weights.add_argument("--ema", dest="ema", action="store_true", help="the EMA weights (when the run has them)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="storage dtype (default: the run's export.dtype)")
    parser.add_argument("--fp16", dest="dtype", action="store_const", const="fp16", help="same as --dtype fp16")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--unet-only", dest="unet_only", action="store_true", default=None)
    parts.add_argument("--full", dest="unet_only", action="store_false", help="all parts (UNet, text encoders, VAE)")
    parser.add_argument("--pretrained", help="the run's parent file at its new path, if it moved")
    parser.add_argument(
        "--model", help="model config, only for a checkpoint outside its run directory (with --unet-only)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = run_export_settings(args.source)
    ema = settings["ema"] if args.ema is None else args.ema
    unet_only = settings["unet_only"] if args.unet_only is None else args.unet_only
    dtype = args.dtype or settings["dtype"]
    try:
        result = export_model(
            args.source,
            args.out,
            weights="ema" if ema else "raw",
            dtype=DTYPES[dtype],
            parts=("unet",) if unet_only else ("unet", "text_encoders", "vae"),
            pretrained=args.pretrained,
            model_config=args.model,
        )
    except (ValueError, FileNotFoundError, CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {result['path']} ({result['weights']} weights, {dtype}, parts {result['parts']}, "
        f"{result['prediction']}-prediction)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

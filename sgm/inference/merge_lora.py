"""Merge LoRA adapters into a base model and write one full official-layout .safetensors file.

    python -m sgm.inference.merge_lora BASE.safetensors OUT.safetensors --lora A.safetensors[:SCALE] \
        [--lora B.safetensors[:SCALE] ...] [--fp16] [--model NAME]

BASE is an official-layout file (released or exported), loaded through sgm.checkpoint.model_source.load_model;
each --lora (kohya LoRA / LoCon file; scale default 1, parsed from the last ':' when it is a number) is merged
in order at its scale (W += scale * alpha / rank * up @ down, in fp32). OUT holds the parts BASE holds, every
tensor the adapters do not touch equal to BASE's (fp32, or fp16 with --fp16), BASE's extra tensors
(v_pred marker, sigma table) and metadata, plus `sgm.merged_loras`; it is written atomically. A LoRA file
that does not fit the model exits with code 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sgm.checkpoint.export import MODELSPEC_PREDICTION
from sgm.checkpoint.fingerprints import file_sha256
from sgm.checkpoint.io import read_layout, read_metadata, save_checkpoint
from sgm.checkpoint.kohya import LoRAFileError, load_lora_file, network_from_state
from sgm.checkpoint.lineage import part_of_group
from sgm.checkpoint.model_source import load_model
from sgm.checkpoint.official_layout import PARTS, part_of_key, to_official
from sgm.inference.cli import lora_arg, report_lora_error

_OWN_METADATA = ("format", "sgm.parts")  # written by save_checkpoint for the new file


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sgm.inference.merge_lora", description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path, help="official-layout .safetensors file (released or exported)")
    p.add_argument("out", type=Path, help="the merged .safetensors file to write")
    p.add_argument(
        "--lora",
        action="append",
        required=True,
        type=lora_arg,
        metavar="FILE[:SCALE]",
        help="kohya LoRA / LoCon .safetensors merged at SCALE (default 1); repeatable, merged in order",
    )
    p.add_argument("--fp16", action="store_true", help="write fp16 tensors (default: fp32, the merge precision)")
    p.add_argument("--model", help="model config name or .yaml (default: the shipped config BASE matches)")
    return p.parse_args(argv)


def merge(
    base: str | Path,
    out: str | Path,
    loras: Sequence[tuple[str, float]],
    dtype: torch.dtype | None = None,
    model_config: str | None = None,
) -> dict[str, Any]:
    """Merge `loras` ((file, scale), in order) into `base` and write `out`; returns what was merged."""
    base, out = Path(base), Path(out)
    if not base.is_file() or base.suffix != ".safetensors":
        raise FileNotFoundError(f"BASE must be an official-layout .safetensors file, got {base}")
    if out.resolve() == base.resolve():
        raise ValueError(f"OUT {out} is BASE; write the merged model to a new file")
    layout = read_layout(base)
    parts = tuple(p for p in PARTS if p in {part_of_key(k) for k in layout})
    loaded = load_model(base, parts=parts, model_config=model_config)
    model = loaded.model
    merged = []
    for path, scale in loras:
        state, _ = load_lora_file(path)
        network = network_from_state(model, state, source=str(path))
        missing = sorted({part_of_group(p) for p in network.parts} - set(parts))
        if missing:
            raise LoRAFileError(f"{path} adapts {', '.join(missing)}, which {base} does not hold")
        network.merge_into(model, scale)
        merged.append(
            {
                "path": str(path),
                "scale": float(scale),
                "sha256": file_sha256(path),
                "modules": len(network),
                "parts": list(network.parts),
            }
        )
    produced = to_official(model, parts)
    with safe_open(str(base), framework="pt") as handle:  # BASE's tensors outside the model (v_pred, sigmas)
        extra = {k: handle.get_tensor(k) for k in layout if k not in produced and part_of_key(k) is None}
    metadata = {k: v for k, v in read_metadata(base).items() if k not in _OWN_METADATA}
    metadata.update(
        {
            "sgm.model": str(loaded.info.get("model", "")),
            "sgm.prediction": loaded.prediction,
            "modelspec.prediction_type": MODELSPEC_PREDICTION[loaded.prediction],
            "sgm.merged_loras": json.dumps(merged),
        }
    )
    path = save_checkpoint(model, out, parts=parts, dtype=dtype, metadata=metadata, extra_tensors=extra)
    return {"path": str(path), "parts": list(parts), "loras": merged}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = merge(args.base, args.out, args.lora, torch.float16 if args.fp16 else None, args.model)
    except LoRAFileError as error:  # a LoRA that does not fit the model: exit code 2
        raise report_lora_error(error) from None
    except (ValueError, FileNotFoundError) as error:  # user-caused: one message, no traceback, exit code 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    for lora in result["loras"]:
        print(
            f"[sgm] merged {lora['path']} at scale {lora['scale']:g} "
            f"({lora['modules']} modules on {', '.join(lora['parts'])})"
        )
    print(f"[sgm] wrote {result['path']} ({', '.join(result['parts'])}, {'fp16' if args.fp16 else 'fp32'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

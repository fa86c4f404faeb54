"""Training checkpoint -> official single-file .safetensors (EMA or raw UNet, fp16/fp32, UNet-only or full).

    python -m sgm.training.export outputs/runs/demo/checkpoints/last.ckpt out.safetensors \
        --model tiny [--raw] [--fp16] [--unet-only] [--pretrained base.safetensors]

A training checkpoint holds the UNet (and its EMA) only; for a full file the frozen parts come
from the model config, or from `--pretrained` (an official file) when the run started from one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
from omegaconf import DictConfig

from sgm.checkpoint.io import load_checkpoint, save_checkpoint
from sgm.models.build import build_model

UNET, EMA_UNET = "model.unet.", "ema.shadow."


def unet_state_from_checkpoint(checkpoint: dict, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """The UNet weights of a Lightning training checkpoint: EMA ones if present and wanted.

    Returns (state dict with UNet-relative keys, whether they are the EMA weights)."""
    state = checkpoint.get("state_dict")
    if state is None:
        raise ValueError("not a Lightning training checkpoint (no 'state_dict'); pass a .ckpt from the run's checkpoints/")
    ema = {k[len(EMA_UNET):]: v for k, v in state.items() if k.startswith(EMA_UNET)}
    if use_ema and ema:
        return ema, True
    raw = {k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)}
    if not raw:
        raise ValueError("the checkpoint holds no 'model.unet.*' weights; is it a training checkpoint of this project?")
    return raw, False


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model_config: str | os.PathLike | DictConfig = "tiny",
    use_ema: bool = True,
    dtype: torch.dtype | None = None,
    unet_only: bool = False,
    pretrained: str | os.PathLike | None = None,
) -> dict[str, object]:
    """Write the official-layout file; returns {"path", "ema", "parts"}."""
    checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=False)
    unet_state, is_ema = unet_state_from_checkpoint(checkpoint, use_ema)
    with torch.device("meta") if unet_only else torch.device("cpu"):
        model = build_model(model_config)
    parts = ("unet",) if unet_only else ("unet", "text_encoders", "vae")
    if unet_only:
        model.unet.to_empty(device="cpu")
    elif pretrained is not None:
        load_checkpoint(model, pretrained, parts=("text_encoders", "vae"))
    model.unet.load_state_dict(unet_state, strict=True)
    path = save_checkpoint(model, out_path, parts=parts, dtype=dtype,
                           metadata={"sgm.weights": "ema" if is_ema else "raw",
                                     "sgm.global_step": str(checkpoint.get("global_step", ""))})  # fmt: skip
    return {"path": str(path), "ema": is_ema, "parts": list(parts)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgm.training.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--model", default="tiny", help="model config name or .yaml path (the run's model)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights even when EMA ones exist")
    parser.add_argument("--fp16", action="store_true", help="store floats as fp16 (as released)")
    parser.add_argument("--unet-only", action="store_true")
    parser.add_argument("--pretrained", default=None, help="official file supplying the frozen parts")
    args = parser.parse_args(argv)
    result = export_checkpoint(args.checkpoint, args.out, args.model, use_ema=not args.raw,
                               dtype=torch.float16 if args.fp16 else None, unet_only=args.unet_only,
                               pretrained=args.pretrained)  # fmt: skip
    print(f"wrote {result['path']} ({'EMA' if result['ema'] else 'raw'} weights, parts {result['parts']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

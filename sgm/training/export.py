"""Training checkpoint -> official single-file .safetensors (EMA or raw UNet, fp16/fp32, UNet-only or full).

    python -m sgm.training.export outputs/runs/demo/checkpoints/last.ckpt out.safetensors \
        --model tiny [--raw] [--fp16] [--unet-only] [--pretrained base.safetensors]

A training checkpoint holds the UNet (and its EMA) only; for a full file the frozen parts come
from the model config, or from `--pretrained` (an official file) when the run started from one.
A DeepSpeed checkpoint (a `.ckpt` directory of per-rank shards, ZeRO-2 or ZeRO-3) is consolidated
in memory: the raw UNet from the optimizers' fp32 master partitions, the EMA (kept whole and fp32
on every rank) from rank 0's module state. No DeepSpeed engine and no GPU are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sgm.checkpoint.io import save_checkpoint
from sgm.models.build import build_model
from sgm.training.checkpoint_io import is_sharded_checkpoint
from sgm.training.lineage import load_pretrained

UNET, EMA_UNET = "model.unet.", "ema.shadow."
# DeepSpeed's own entries in a module-state file, left out of the Lightning checkpoint dict it holds
DEEPSPEED_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                  "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
                  "checkpoint_parallel_dimensions", "ds_version")  # fmt: skip


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint as Lightning's dict ("state_dict", "global_step", ...): a `.ckpt` file, or a
    DeepSpeed checkpoint directory consolidated to fp32 in memory."""
    path = Path(path)
    if path.is_dir():
        return consolidate_deepspeed_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}: pass a .ckpt file or directory from the run's checkpoints/")
    return torch.load(str(path), map_location="cpu", weights_only=False)


def consolidate_deepspeed_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed checkpoint directory (ZeRO-2 or ZeRO-3, any world size) as one Lightning checkpoint dict.

    The trained weights come from the fp32 master partitions of every rank's optimizer shard
    (DeepSpeed's zero_to_fp32), the EMA and Lightning's own entries (step, loops, callbacks, data
    loader position) from rank 0's module-state file.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a directory but not a DeepSpeed checkpoint (no 'latest' file in it); pass the "
                         "*.ckpt directory itself, e.g. <run_dir>/checkpoints/last.ckpt")  # fmt: skip
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = path / (path / "latest").read_text().strip()
    model_files = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    model_file = next((f for f in model_files if f.is_file()), None)
    if model_file is None:
        raise ValueError(f"{tag_dir} holds no rank-0 module state ({model_files[0].name}); is the checkpoint complete?")
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every step
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path))
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    checkpoint = {k: v for k, v in saved.items() if k not in DEEPSPEED_KEYS}
    ema = {k: v for k, v in saved["module"].items() if k.startswith("ema.")}  # not a parameter: not in zero_to_fp32
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in {**weights, **ema}.items()}
    return checkpoint


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
    pretrained_parts: Sequence[str] | None = None,
) -> dict[str, object]:
    """Write the official-layout file; returns {"path", "ema", "parts"}.

    pretrained / pretrained_parts: the file and parts the run started from (as in training); the
    frozen parts among them come from that file, the others from the model config."""
    checkpoint = load_training_checkpoint(checkpoint_path)
    unet_state, is_ema = unet_state_from_checkpoint(checkpoint, use_ema)
    with torch.device("meta") if unet_only else torch.device("cpu"):
        model = build_model(model_config)
    parts = ("unet",) if unet_only else ("unet", "text_encoders", "vae")
    if unet_only:
        model.unet.to_empty(device="cpu")
    elif pretrained is not None:
        chosen = [pretrained_parts] if isinstance(pretrained_parts, str) else pretrained_parts
        frozen = [p for p in (chosen or ("text_encoders", "vae")) if p != "unet"]
        if frozen:  # matched by shape: a refiner takes the bigG tower of a base file
            load_pretrained(model, pretrained, frozen)
    model.unet.load_state_dict(unet_state, strict=True)
    path = save_checkpoint(model, out_path, parts=parts, dtype=dtype,
                           metadata={"sgm.weights": "ema" if is_ema else "raw",
                                     "sgm.global_step": str(checkpoint.get("global_step", ""))})  # fmt: skip
    return {"path": str(path), "ema": is_ema, "parts": list(parts)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgm.training.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training .ckpt file, or a DeepSpeed .ckpt directory")
    parser.add_argument("out")
    parser.add_argument("--model", default="tiny", help="model config name or .yaml path (the run's model)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights even when EMA ones exist")
    parser.add_argument("--fp16", action="store_true", help="store floats as fp16 (as released)")
    parser.add_argument("--unet-only", action="store_true")
    parser.add_argument("--pretrained", default=None, help="official file supplying the frozen parts")
    parser.add_argument("--pretrained-parts", nargs="+", default=None, metavar="PART",
                        help="the parts the run loaded from --pretrained (default: all)")
    args = parser.parse_args(argv)
    result = export_checkpoint(args.checkpoint, args.out, args.model, use_ema=not args.raw,
                               dtype=torch.float16 if args.fp16 else None, unet_only=args.unet_only,
                               pretrained=args.pretrained, pretrained_parts=args.pretrained_parts)  # fmt: skip
    print(f"wrote {result['path']} ({'EMA' if result['ema'] else 'raw'} weights, parts {result['parts']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

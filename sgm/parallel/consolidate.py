"""Any training checkpoint as one Lightning checkpoint dict: a `.ckpt` file, or a DeepSpeed directory consolidated in memory.

A DeepSpeed directory (ZeRO-2 or ZeRO-3, any world size) needs no engine and no GPU: the trained
weights come from the fp32 master partitions of every rank's optimizer shard (DeepSpeed's
zero_to_fp32), the EMA (kept whole and fp32 on every rank, not a parameter) and Lightning's own
entries (step, loops, callbacks, data loader position) from rank 0's module-state file.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from sgm.parallel.checkpoints import is_sharded_checkpoint

# DeepSpeed's own entries in a module-state file, left out of the Lightning checkpoint dict it holds
DEEPSPEED_KEYS = (
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "checkpoint_parallel_dimensions",
    "ds_version",
)
WRAPPER_PREFIX = "_forward_module."  # older Lightning wrapped the module before handing it to DeepSpeed


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint as Lightning's dict ("state_dict", "global_step", ...): a `.ckpt` file, or a
    DeepSpeed checkpoint directory consolidated to fp32 in memory. On the CPU either way."""
    path = Path(path)
    if path.is_dir():
        return consolidate_deepspeed_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no training checkpoint at {path}: pass a .ckpt file or directory from the run's checkpoints/"
        )
    return torch.load(str(path), map_location="cpu", weights_only=False)


def consolidate_deepspeed_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed checkpoint directory (ZeRO-2 or ZeRO-3, any world size) as one Lightning checkpoint dict."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(
            f"{path} is a directory but not a DeepSpeed checkpoint (no 'latest' file in it); pass the "
            "*.ckpt directory itself, e.g. <run_dir>/checkpoints/last.ckpt"
        )
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
    ema = {k: v for k, v in saved["module"].items() if k.removeprefix(WRAPPER_PREFIX).startswith("ema.")}
    checkpoint["state_dict"] = {k.removeprefix(WRAPPER_PREFIX): v for k, v in {**weights, **ema}.items()}
    return checkpoint

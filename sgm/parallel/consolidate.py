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

from sgm.parallel.checkpoints import is_sharded_checkpoint, module_state_file

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
WEIGHT_ENTRIES = ("state_dict", "optimizer_states", "module", "optimizer")  # left out by read_checkpoint_entries
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

    try:
        model_file = module_state_file(path)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every step
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path))
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    checkpoint = {k: v for k, v in saved.items() if k not in DEEPSPEED_KEYS}
    ema = {k: v for k, v in saved["module"].items() if k.removeprefix(WRAPPER_PREFIX).startswith("ema.")}
    checkpoint["state_dict"] = {k.removeprefix(WRAPPER_PREFIX): v for k, v in {**weights, **ema}.items()}
    return checkpoint


def read_checkpoint_entries(path: str | os.PathLike) -> dict[str, Any]:
    """Lightning's entries of a training checkpoint (step, loops, callbacks, the data position) without its
    weights or optimizer state, for checks before a run starts: the `.ckpt` file or a DeepSpeed directory's
    rank-0 module-state file is memory-mapped, so its tensors are not read. {} when there is no such file."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        try:
            path = module_state_file(path)
        except FileNotFoundError:
            return {}
    if not path.is_file():
        return {}
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return {key: value for key, value in saved.items() if key not in WEIGHT_ENTRIES}

"""Lightning's own entries of a training checkpoint (step, loops, callbacks, the data position), without its weights.

For checks before a run starts (preflight): a `.ckpt` file or the rank-0 module-state file of a DeepSpeed
directory is memory-mapped, so its tensors are not read; DeepSpeed's and Lightning's weight entries are left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sgm.parallel.checkpoints import is_sharded_checkpoint

WEIGHT_ENTRIES = ("state_dict", "optimizer_states", "module", "optimizer")


def read_checkpoint_entries(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's entries other than weights and optimizer state ({} when there is no such file)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        tag_dir = path / (path / "latest").read_text().strip()
        candidates = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        return {}
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return {key: value for key, value in saved.items() if key not in WEIGHT_ENTRIES}

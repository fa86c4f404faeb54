"""Atomic Lightning checkpoints: a crash mid-save keeps the previous good file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sgm.checkpoint.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then rename over it.

    Lightning's own writer streams into the final path, so a kill mid-write leaves a truncated
    `last.ckpt` that `resume=auto` would then pick. Local paths only (remote URLs: use Lightning's).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written *.ckpt in `folder` (what resume=auto continues), or None."""
    candidates = [p for p in Path(folder).glob("*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None

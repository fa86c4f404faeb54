"""Crash-safe Lightning checkpoints: the checkpoint writer and callback the trainer is built with.

`AtomicCheckpointIO` writes a `.ckpt` file whole; `SafeModelCheckpoint` brackets each save with the
parallelism seam's `begin_save` / `end_save`, so a sharded directory counts (for resume=auto) only once
every rank wrote it. The on-disk forms, the bracket, `save_training_checkpoint` and `newest_checkpoint` live in
`sgm.parallel.checkpoints`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from sgm.checkpoint.io import atomic_write
from sgm.parallel.checkpoints import begin_save, end_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then rename over it.

    Lightning's own writer streams into the final path, so a kill mid-write leaves a truncated
    `last.ckpt` that `resume=auto` would then pick. Local paths only (remote URLs: use Lightning's).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class SafeModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose sharded directories count as checkpoints only once complete."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        begin_save(trainer, filepath)
        super()._save_checkpoint(trainer, filepath)
        end_save(trainer, filepath)

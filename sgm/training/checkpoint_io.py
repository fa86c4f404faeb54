"""Crash-safe Lightning checkpoints: a crash mid-save never leaves resume=auto a half-written checkpoint.

Two kinds of training checkpoint exist. A `.ckpt` file (single process, DDP) goes through
`AtomicCheckpointIO`: written beside the target, fsynced, renamed over it. A `.ckpt` directory of
per-rank shards (DeepSpeed) is written by DeepSpeed itself, straight into the target directory
(Lightning bypasses CheckpointIO there), so `SafeModelCheckpoint` (and `save_checkpoint`, for other
callers) bracket the save instead: rank 0 deletes the old directory and its completion marker first,
every rank writes its shards, and rank 0 writes the marker once all ranks are done.
`newest_checkpoint` only counts marked directories.
What holds: the newest complete checkpoint always survives a crash, but `last.ckpt` itself does
not when the crash hits its rewrite (resume=auto then takes the periodic one of the same step, or
the previous one: keep `checkpoint.save_top_k` != 0). Shard files are not fsynced (DeepSpeed's writer).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from sgm.checkpoint.io import atomic_write

COMPLETE_MARKER = "sgm_complete"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then rename over it.

    Lightning's own writer streams into the final path, so a kill mid-write leaves a truncated
    `last.ckpt` that `resume=auto` would then pick. Local paths only (remote URLs: use Lightning's).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a DeepSpeed checkpoint directory (a `latest` tag file and the shards' folder)."""
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


def save_checkpoint(trainer: pl.Trainer, filepath: str | os.PathLike, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint` (call on every rank) that marks a sharded directory complete after all ranks wrote."""
    begin_save(trainer, filepath)
    trainer.save_checkpoint(filepath, weights_only)
    end_save(trainer, filepath)


def begin_save(trainer: pl.Trainer, filepath: str | os.PathLike) -> None:
    """Rank 0 clears an old checkpoint directory at `filepath` (marker first) before the save writes anything.

    The other ranks cannot write earlier: a save starts with collectives (the data module's state
    gather, DeepSpeed's path broadcast) that wait for rank 0. Stale shards (from another world size)
    would otherwise confuse loading and consolidation.
    """
    path = Path(filepath)
    if trainer.is_global_zero and path.is_dir():
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)


def end_save(trainer: pl.Trainer, filepath: str | os.PathLike) -> None:
    """Rank 0 marks a checkpoint directory complete (`trainer.save_checkpoint` ends with a barrier: all shards are in)."""
    path = Path(filepath)
    if trainer.is_global_zero and path.is_dir():
        atomic_write(path / COMPLETE_MARKER, lambda tmp: Path(tmp).write_text(f"{trainer.global_step}\n"))


class SafeModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose sharded (DeepSpeed) directories count as checkpoints only once complete."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        begin_save(trainer, filepath)
        super()._save_checkpoint(trainer, filepath)
        end_save(trainer, filepath)


def check_fits_strategy(path: str | os.PathLike, deepspeed: bool) -> None:
    """Fail early, naming the fix, when a checkpoint to resume cannot be read by the configured strategy."""
    if is_sharded_checkpoint(path) and not deepspeed:
        raise ValueError(
            f"{path} is a DeepSpeed checkpoint directory but the strategy is not DeepSpeed: resume with the strategy "
            "that wrote it (strategy=deepspeed_zero2 / deepspeed_zero3 ...), or export it (python -m sgm.training.export "
            "DIR out.safetensors) and start a new run from that file (pretrained=out.safetensors name=...)"
        )
    if Path(path).is_file() and deepspeed:
        raise ValueError(
            f"{path} is a single-file checkpoint but the strategy is DeepSpeed, which resumes only from its own "
            "checkpoint directories: resume with the strategy that wrote it (strategy=ddp ...), or export it and start "
            "a new run from the file (pretrained=out.safetensors name=...)"
        )


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently completed checkpoint in `folder` (what resume=auto continues), or None.

    `*.ckpt` files, and `*.ckpt` directories (DeepSpeed shards) carrying their completion marker,
    ordered by when they were completed.
    """
    completed: dict[Path, int] = {}
    for path in Path(folder).glob("*.ckpt"):
        if path.is_file():
            completed[path] = path.stat().st_mtime_ns
        elif (path / COMPLETE_MARKER).is_file():
            completed[path] = (path / COMPLETE_MARKER).stat().st_mtime_ns
    return max(completed, key=lambda p: completed[p]) if completed else None

"""The two on-disk forms of a training checkpoint, and saving either so that a crash never leaves a half one.

A `.ckpt` file (single process, DDP) is written whole by `AtomicCheckpointIO`
(sgm/training/checkpoint_io.py). A `.ckpt` directory of per-rank shards (DeepSpeed) is written by the
engine itself, straight into the target directory (Lightning bypasses CheckpointIO there), so saves
are bracketed instead: rank 0 deletes the old directory and its completion marker first
(`begin_save`), every rank writes its shards, and rank 0 writes the marker once all ranks are done
(`end_save`). `newest_checkpoint` only counts marked directories.
What holds: the newest complete checkpoint always survives a crash, but `last.ckpt` itself does
not when the crash hits its rewrite (resume=auto then takes the periodic one of the same step, or
the previous one: keep `checkpoint.save_top_k` != 0). Shard files are not fsynced (DeepSpeed's writer).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sgm.checkpoint.io import atomic_write

COMPLETE_MARKER = "sgm_complete"
LATEST_UNIVERSAL = "latest_universal"  # DeepSpeed's tag file of a universal checkpoint (sgm.parallel.reshard)
MODULE_STATE_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-2, ZeRO-3


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a sharded (DeepSpeed) checkpoint directory: a `latest` tag file and the shards' folder."""
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


def module_state_file(path: str | os.PathLike) -> Path:
    """Rank 0's module-state file of a DeepSpeed checkpoint directory (sharded or universal): the module's
    whole-model entries and Lightning's own (step, loops, callbacks, the data position)."""
    path = Path(path)
    tag_file = path / LATEST_UNIVERSAL if (path / LATEST_UNIVERSAL).is_file() else path / "latest"
    tag_dir = path / tag_file.read_text().strip()
    for name in MODULE_STATE_FILES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(
        f"{tag_dir} holds no rank-0 module state ({MODULE_STATE_FILES[0]}); is the checkpoint complete?"
    )


def save_training_checkpoint(trainer: Any, filepath: str | os.PathLike, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint` (call on every rank) that marks a sharded directory complete after all ranks wrote."""
    begin_save(trainer, filepath)
    trainer.save_checkpoint(filepath, weights_only)
    end_save(trainer, filepath)


def begin_save(trainer: Any, filepath: str | os.PathLike) -> None:
    """Rank 0 clears an old checkpoint directory at `filepath` (marker first) before the save writes anything.

    The other ranks cannot write earlier: a save starts with collectives (the data module's state
    gather, DeepSpeed's path broadcast) that wait for rank 0. Stale shards (from another world size)
    would otherwise confuse loading and consolidation.
    """
    path = Path(filepath)
    if trainer.is_global_zero and path.is_dir():
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)


def end_save(trainer: Any, filepath: str | os.PathLike) -> None:
    """Rank 0 marks a checkpoint directory complete (`trainer.save_checkpoint` ends with a barrier: all shards are in)."""
    path = Path(filepath)
    if trainer.is_global_zero and path.is_dir():
        atomic_write(path / COMPLETE_MARKER, lambda tmp: Path(tmp).write_text(f"{trainer.global_step}\n"))


def newest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The most recently completed checkpoint in `folder` (what resume=auto continues), or None.

    `*.ckpt` files, and `*.ckpt` directories (shards) carrying their completion marker, ordered by
    when they were completed.
    """
    completed: dict[Path, int] = {}
    for path in Path(folder).glob("*.ckpt"):
        if path.is_file():
            completed[path] = path.stat().st_mtime_ns
        elif (path / COMPLETE_MARKER).is_file():
            completed[path] = (path / COMPLETE_MARKER).stat().st_mtime_ns
    return max(completed, key=lambda p: completed[p]) if completed else None

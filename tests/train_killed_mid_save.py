"""Test harness (not a test): `python tests/train_killed_mid_save.py <overrides>` trains as train.py does, but
SIGKILLs its whole process group (every rank) in the middle of checkpoint save number $SGM_TEST_KILL_AT_SAVE
(1-based, counted on rank 0): a `.ckpt` file half written to its temporary file, or a sharded (DeepSpeed)
directory whose shards are all written but not yet marked complete. The fault is injected by patching the
two save points of sgm/training/checkpoint_io.py; everything else is the real training run."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sgm.training.checkpoint_io as checkpoint_io
from sgm.train import main

KILL_AT = int(os.environ.get("SGM_TEST_KILL_AT_SAVE", "0"))
_saves = 0


def _die() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _counted() -> bool:
    """Whether this save (on rank 0) is the one to die in."""
    global _saves
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return False
    _saves += 1
    return _saves == KILL_AT


_atomic_write, _end_save = checkpoint_io.atomic_write, checkpoint_io.end_save


def atomic_write_then_die(path, write):
    if not _counted():
        return _atomic_write(path, write)

    def half_written(tmp):
        write(tmp)
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        _die()

    return _atomic_write(path, half_written)


def end_save_or_die(trainer, filepath):
    if Path(filepath).is_dir() and _counted():
        _die()
    return _end_save(trainer, filepath)


checkpoint_io.atomic_write, checkpoint_io.end_save = atomic_write_then_die, end_save_or_die

if __name__ == "__main__":
    main()

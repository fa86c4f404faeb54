"""Progress you can see: one line every N optimizer steps on rank 0, through the "sgm" logger, so it goes to
the console and to <run_dir>/train.log:

    [sgm] step 120/200 | loss 0.1234 | lr 1.0e-04 | 18.3 img/s | data-wait 3% | ETA 1m05s

loss is the mean over the steps since the previous line; img/s, data-wait (the share of wall time spent
outside the training step, waiting for the next batch) and the ETA (from the mean step time since the
previous line) cover the same steps. The first step (model start-up included) gives loss and lr only.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

LOGGER = logging.getLogger("sgm")
CONSOLE_FORMAT = "[%(name)s] %(message)s"
FILE_FORMAT = "%(asctime)s [%(name)s] %(message)s"


def progress_interval(setting: int | str | None, max_steps: int) -> int:
    """Steps between lines: `auto` gives about ten lines a run (every 10% of max_steps, at most every 50
    steps); 0 switches the lines off."""
    if setting in (None, "auto"):
        return max(1, min(50, math.ceil(max(max_steps, 1) / 10)))
    return int(setting)


def format_duration(seconds: float) -> str:
    """1h05m, 3m07s, 42s."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLog(pl.Callback):
    """Logs a progress line on rank 0 at the first step, every `every_n_steps` optimizer steps and the last."""

    def __init__(self, every_n_steps: int, logger: logging.Logger = LOGGER) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.logger = logger
        self._first = 1
        self._reset(0)

    def _reset(self, step: int) -> None:
        self._line_step, self._line_time = step, time.perf_counter()
        self._images, self._outside, self._batch_end = 0, 0.0, None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(trainer.global_step)
        self._first = trainer.global_step + 1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_end is not None:
            self._outside += time.perf_counter() - self._batch_end

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps <= 0 or not trainer.is_global_zero:
            return
        keys = batch.get("__key__") if isinstance(batch, dict) else None
        self._images += len(keys) * trainer.world_size if keys is not None else 0
        loss = trainer.callback_metrics.get("train/loss")
        if isinstance(loss, torch.Tensor):  # summed where it lives: no device sync until a line is written
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
            self._loss_count += 1
        step = trainer.global_step
        if step > self._line_step and (
            step == self._first or step % self.every_n_steps == 0 or step >= trainer.max_steps
        ):
            self.logger.info(self._line(trainer, step))
            self._reset(step)
        self._batch_end = time.perf_counter()

    def _line(self, trainer: pl.Trainer, step: int) -> str:
        parts = [f"step {step}/{trainer.max_steps}"]
        if self._loss_sum is not None and self._loss_count:
            parts.append(f"loss {float(self._loss_sum) / self._loss_count:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.1e}")
        if step != self._first:  # the first step's time is mostly start-up
            seconds = max(time.perf_counter() - self._line_time, 1e-9)
            parts += [f"{self._images / seconds:.1f} img/s", f"data-wait {min(1.0, self._outside / seconds):.0%}"]
            remaining = max(trainer.max_steps - step, 0) * seconds / (step - self._line_step)
            parts.append(f"ETA {format_duration(remaining)}")
        return " | ".join(parts)


# -- where the lines go ----------------------------------------------------------------------------------------
def console_logging() -> None:
    """The "sgm" logger at INFO, printing to stdout when nothing else handles it (Hydra's job logging
    prints through the root logger; pytest captures it)."""
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)
    if not LOGGER.hasHandlers():
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        LOGGER.addHandler(handler)


class _CurrentStdout(logging.StreamHandler):
    """Writes to sys.stdout as it is when a line is logged (callers and pytest swap it), not as it was."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ assigns one; the current sys.stdout is always used


def attach_log_file(path: Path) -> logging.Handler | None:
    """Append the log (the root logger's, so also other libraries' warnings) to `path`; None when stdout
    already goes to that file (a caller that redirects the run's output into it)."""
    if _stdout_is(path):
        return None
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _stdout_is(path: Path) -> bool:
    try:
        return path.exists() and os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(path))
    except (AttributeError, OSError, ValueError):  # no real stdout (captured, closed)
        return False

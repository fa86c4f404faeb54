"""Preemption under SLURM: on the requeue signal, checkpoint at a step boundary, requeue the job, stop.

SLURM delivers the signal (`sbatch --signal=USR1@<seconds>` before the time limit, or `scancel
--signal=USR1`) to every process of the job's steps, each at a different point of its step.
Lightning's own auto-requeue saves from inside the signal handler, mid-step: under DDP its
collectives (the data module's state gather, barriers) can meet another rank's gradient
all-reduce, and it writes `hpc_ckpt_N.ckpt` into the run dir, where `resume=auto` does not look
(the requeued job would go back to the last periodic checkpoint). So the handler here only sets a
flag; after each optimizer step the ranks agree (any rank signalled -> all act), save
`<run_dir>/checkpoints/requeue.ckpt` together, rank 0 runs `scontrol requeue` and the run stops
with `Preempted`. The requeued job keeps its job id, so its run dir is the same and `resume=auto`
continues from that file, data position included (the data module saves the loader state after
the last trained batch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

from sgm.parallel import save_training_checkpoint


class Preempted(Exception):
    """The run stopped after saving a checkpoint on the requeue signal (the job was requeued)."""


def requeue_slurm_job() -> str:
    """`scontrol requeue` this job (array task aware); returns a one-line outcome for the log."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a SLURM job (no SLURM_JOB_ID): not requeued, resubmit it to resume"
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"scontrol requeue {job} failed ({error}): resubmit the job to resume"
    if result.returncode != 0:
        return f"scontrol requeue {job} failed ({result.stderr.strip()}): resubmit the job to resume"
    return f"job {job} requeued"


class RequeueOnSignal(pl.Callback):
    """Checkpoint to `checkpoint_path`, requeue and raise `Preempted` once any rank got `signum`."""

    def __init__(
        self,
        checkpoint_path: str | Path,
        signum: int = signal.SIGUSR1,
        requeue: Callable[[], str] = requeue_slurm_job,
    ) -> None:
        super().__init__()
        self.checkpoint_path = Path(checkpoint_path)
        self.signum = signum
        self.requeue = requeue
        self.signalled = False
        self._previous_handler: Any = None
        self._last_step = -1

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True  # only a flag: the work happens at the next step boundary

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Installed before the data loader forks its workers, which inherit this harmless handler
        # (SLURM signals them too; the default action of USR1 would kill them).
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:  # mid gradient accumulation, or a skipped step
            return
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        save_training_checkpoint(trainer, self.checkpoint_path)  # a sharded directory counts once complete
        if trainer.is_global_zero:  # report first: SLURM starts stopping the job as soon as it is requeued
            print(f"[sgm] preempted at step {trainer.global_step}: saved {self.checkpoint_path}", flush=True)
            print(f"[sgm] {self.requeue()}", flush=True)
        raise Preempted(f"stopped at step {trainer.global_step} after saving {self.checkpoint_path}")


def slurm_plugins() -> list[Any]:
    """Under SLURM: its environment with Lightning's mid-step auto-requeue off (RequeueOnSignal does it)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def slurm_callbacks(run_dir: Path) -> list[pl.Callback]:
    """Under SLURM: RequeueOnSignal writing `<run_dir>/checkpoints/requeue.ckpt`; elsewhere nothing."""
    return [RequeueOnSignal(run_dir / "checkpoints" / "requeue.ckpt")] if SLURMEnvironment.detect() else []

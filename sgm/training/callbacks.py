"""Callbacks: validation samples for fixed prompts and seeds, throughput and data-wait logging,
a checkpoint when bad data stops the run, the clean-up of a re-sharded checkpoint copy."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from sgm.data.loader import TooManyBadSamples
from sgm.inference import generate_latents, image_grid, latents_to_uint8
from sgm.parallel import COMPLETE_MARKER, newest_checkpoint, plan_for, save_training_checkpoint


class SampleImages(pl.Callback):
    """Every `every_n_steps` optimizer steps (and at the end) sample the prompts, one seed per row.

    Uses the EMA weights when the module has them (its `ema_applied`). Rank 0 only, and only where the
    strategy lets rank 0 run the model alone (not with sharded weights); the grid (rows = seeds, columns =
    prompts) goes to `<out_dir>/step_<step>.png` and to the logger when it has `log_image` (wandb).
    """

    def __init__(
        self,
        out_dir: str,
        prompts: Sequence[str],
        seeds: Sequence[int] = (0,),
        every_n_steps: int = 0,
        height: int = 128,
        width: int = 128,
        sampler: Callable[[], Any] | Any = None,
        guidance_scale: float = 5.0,
        use_ema: bool = True,
        at_train_end: bool = True,
    ) -> None:
        super().__init__()
        self.out_dir, self.prompts, self.seeds = Path(out_dir), list(prompts), list(seeds)
        self.every_n_steps, self.height, self.width = every_n_steps, height, width
        self.sampler, self.guidance_scale, self.use_ema, self.at_train_end = (
            sampler,
            guidance_scale,
            use_ema,
            at_train_end,
        )
        self.written: list[Path] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Write (rank 0) and log the grid for the current step; returns its path."""
        self._last_step = trainer.global_step
        if trainer.global_rank != 0 or not plan_for(getattr(trainer, "strategy", None)).samples_on_rank_zero:
            return None
        weights = (
            pl_module.ema_applied(self.use_ema) if hasattr(pl_module, "ema_applied") else nullcontext(pl_module.model)
        )
        was_training = pl_module.training
        pl_module.eval()
        rows = []
        try:
            with weights as model:
                for seed in self.seeds:
                    sampler = self.sampler() if callable(self.sampler) else self.sampler
                    with torch.autocast(device_type=pl_module.device.type, enabled=False):
                        latents = generate_latents(
                            model,
                            self.prompts,
                            self.height,
                            self.width,
                            sampler=sampler,
                            denoiser=getattr(pl_module, "denoiser", None),
                            guidance_scale=self.guidance_scale,
                            seed=[seed] * len(self.prompts),  # a row shares its noise: columns differ by prompt only
                        )
                    rows.append(latents_to_uint8(model, latents))
        finally:
            pl_module.train(was_training)
        grid = image_grid(torch.cat(rows), columns=len(self.prompts))
        path = self.out_dir / f"step_{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.written.append(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key="samples", images=[grid], step=trainer.global_step, caption=[" | ".join(self.prompts)]
                )
        return path


class ThroughputMonitor(pl.Callback):
    """Logs images/s, the fraction of step time spent waiting for data, and skipped samples by reason."""

    def __init__(self) -> None:
        super().__init__()
        self._last: float | None = None
        self.images_per_second: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._last is None:
            self._last = time.perf_counter()
            tracked = getattr(trainer.datamodule, "tracked", None) if trainer.datamodule else None
            if tracked is not None:
                tracked.take_wait_seconds()  # the first fetch (worker start-up) is not a step's wait

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        seconds = max(now - (self._last or now), 1e-9)
        self._last = now
        batch_size = len(batch["__key__"])  # image and cached-latent batches alike
        images = batch_size * trainer.world_size
        self.images_per_second.append(images / seconds)
        metrics = {"train/images_per_second": images / seconds}
        datamodule = trainer.datamodule
        tracked = getattr(datamodule, "tracked", None) if datamodule is not None else None
        if tracked is not None:
            metrics["train/data_wait_fraction"] = min(1.0, tracked.take_wait_seconds() / seconds)
            for reason, count in tracked.loader.bad_counts().items():
                metrics[f"data/skipped_{reason}"] = float(count)
        pl_module.log_dict(metrics, batch_size=batch_size)


class BatchKeyLog(pl.Callback):
    """Appends `step<TAB>key,key,...` per trained batch (rank 0's batch) to a file: which samples each step saw.

    Cheap, and what a resume check compares: after `resume=auto` the steps must see the same keys
    as an uninterrupted run.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as stream:
            stream.write(f"{trainer.global_step}\t{','.join(map(str, batch.get('__key__', [])))}\n")


def read_batch_keys(path: str | Path) -> dict[int, list[str]]:
    """step -> keys from a BatchKeyLog file; a step logged twice (a resumed run) keeps its last entry."""
    steps: dict[int, list[str]] = {}
    for line in Path(path).read_text().splitlines():
        step, _, keys = line.partition("\t")
        steps[int(step)] = keys.split(",") if keys else []
    return steps


class CheckpointOnBadData(pl.Callback):
    """When the loader stops the run for too many bad samples (TooManyBadSamples, raised in the main
    process while fetching a batch), save what was trained to `path` and name it in the error.

    The data module's state in that checkpoint is the one after the last TRAINED batch. Under
    several ranks the stop is one rank's, and a save needs every rank: nothing is saved there."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, TooManyBadSamples) or trainer.world_size > 1:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_training_checkpoint(trainer, self.path)
        exception.checkpoint = f"{self.path} (step {trainer.global_step})"


class RemoveReshardedCopy(pl.Callback):
    """Rank 0 deletes `copy`, the re-sharded (universal) form of the checkpoint a run resumed from on another
    world size (sgm.parallel.reshard; for SDXL tens of GB), once the run has completed a checkpoint of its own."""

    def __init__(self, checkpoint_dir: str | Path, copy: Path | None = None) -> None:
        super().__init__()
        self.checkpoint_dir, self.copy = Path(checkpoint_dir), copy
        self.started_ns = time.time_ns()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._remove_once_superseded(trainer)  # Lightning runs checkpoint callbacks last: look before the next batch

    def on_fit_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._remove_once_superseded(trainer)

    def _remove_once_superseded(self, trainer: pl.Trainer) -> None:
        if self.copy is None or trainer.global_rank != 0:
            return
        newest = newest_checkpoint(self.checkpoint_dir)
        if newest is None:
            return
        completed = newest / COMPLETE_MARKER if newest.is_dir() else newest
        if completed.stat().st_mtime_ns >= self.started_ns:
            shutil.rmtree(self.copy, ignore_errors=True)
            self.copy = None

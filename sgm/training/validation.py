"""Held-out validation loss: a number that depends only on the weights, logged every N steps and at the end.

Every held-out sample (sgm/data/validation_set.py) is scored at the midpoint timestep of each of
`timestep_buckets` equal ranges of the training schedule, with noise drawn from a generator seeded by
(run seed, sample key, range): the per-sample loss is the weighted loss training minimises (DiffusionLoss's
weighting, offset noise included), without caption dropout. Images are encoded once, at the first
evaluation, to the VAE posterior mean x scale factor (fp32); cached-latent shards give their latents.

Across processes: sample i of the key-sorted set is scored on rank i % world_size; each rank sums its
losses per range in float64 and the sums are all-reduced, so the result equals (to float rounding) a
single process's, and a resume's, which re-scores the same weights. Every rank runs the same number of
model calls (short ranks repeat a batch with weight 0): ZeRO-3 gathers parameters in each call (and the
conditioner's all at once: its text encoders read weights outside their own forward).

When: every `every_n_steps` optimizer steps (after the step and its EMA update), at the end of training
unless that step was just scored, and with `at_start` before the first step (unless the log has it).

Logged as `val/loss`, `val/loss_t<b>` (raw weights) and `val/ema_loss`, `val/ema_loss_t<b>` (the EMA,
when the run has one and `validation.ema`; not under ZeRO-3, whose partitioned weights cannot take the
EMA in place) through the trainer's loggers at the global step, and as one JSON line per evaluation and
weights in `<run_dir>/validation.jsonl` (`read_validation_log`). A resumed run first drops the lines of
steps after the step it resumes from, so the file matches an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from hashlib import sha256
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from sgm.checkpoint.io import atomic_write
from sgm.data.validation_set import (
    describe_shards,
    held_out_processor,
    read_held_out,
    select_held_out,
    stack_inputs,
)
from sgm.diffusion.loss import DiffusionLoss
from sgm.parallel import plan_for
from sgm.records import read_jsonl
from sgm.training.module import BATCH_META_KEYS, pixels_to_unit_range
from sgm.training.progress import LOGGER
from sgm.training.validation_split import ValidationPlan, write_split

LOG_FILE = "validation.jsonl"
PIXELS, LATENTS = "jpg", "latents"


# -- fixed randomness ----------------------------------------------------------------------------------------
def bucket_timesteps(t_min: int, t_max: int, buckets: int) -> list[int]:
    """The midpoint timestep of each of `buckets` equal ranges of [t_min, t_max] (inclusive)."""
    count = t_max - t_min + 1
    if not 1 <= buckets <= count:
        raise ValueError(
            f"validation.timestep_buckets must lie in [1, {count}] for timesteps {t_min}..{t_max}, got {buckets}"
        )
    return [t_min + ((2 * b + 1) * count) // (2 * buckets) for b in range(buckets)]


def noise_seed(seed: int, key: str, bucket: int) -> int:
    """The seed of the noise of sample `key` at timestep range `bucket` (63 bits), in module.batch_seed's style."""
    digest = sha256(f"sgm-validation:{seed}:{key}:{bucket}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fixed_noise(loss: DiffusionLoss, shape: Sequence[int], seed: int, key: str, bucket: int) -> Tensor:
    """The noise (with the loss's offset noise) of one sample at one range: float32 on the CPU, any device alike."""
    generator = torch.Generator().manual_seed(noise_seed(seed, key, bucket))
    return loss.sample_noise(torch.empty(1, *shape), generator)[0]


# -- the log -------------------------------------------------------------------------------------------------
def read_validation_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The evaluations a run logged (`<run_dir>/validation.jsonl`), in order: {"step", "weights" ("raw" | "ema"),
    "loss", "loss_by_bucket", "timesteps", "samples"} each; [] when there are none. A line cut short by a kill is
    left out."""
    return read_jsonl(Path(run_dir) / LOG_FILE)


def keep_steps_until(run_dir: str | os.PathLike, step: int) -> set[int]:
    """Drop the log's lines of steps after `step` (a killed run's, past the checkpoint resumed); returns the
    steps left. Rewritten atomically, only when something is dropped."""
    path = Path(run_dir) / LOG_FILE
    records = read_validation_log(run_dir)
    kept = [r for r in records if int(r["step"]) <= step]
    if path.is_file() and len(kept) != len(path.read_text().splitlines()):
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(path, lambda tmp: tmp.write_text(text))
    return {int(r["step"]) for r in kept}


# -- the callback --------------------------------------------------------------------------------------------
class ValidationLoss(pl.Callback):
    """Scores the held-out set every `every_n_steps` optimizer steps, at the end of training, and (`at_start`)
    before the first step; see the module docstring."""

    def __init__(self, plan: ValidationPlan, run_dir: str | os.PathLike, seed: int, batch_size: int) -> None:
        super().__init__()
        self.settings, self.shards, self.split = plan.settings, list(plan.shards), plan.split
        self.run_dir, self.seed, self.batch_size = Path(run_dir), int(seed), int(batch_size)
        self._last_step = -1
        self._held_out: _HeldOutData | None = None
        self._said_raw_only = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.split is not None and trainer.global_rank == 0:
            write_split(self.run_dir, self.split)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        recorded = keep_steps_until(self.run_dir, step) if trainer.global_rank == 0 else set()
        evaluated = trainer.strategy.broadcast(step in recorded, src=0)
        self._last_step = step if evaluated else -1
        if self.settings.at_start and not evaluated:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step, every = trainer.global_step, self.settings.every_n_steps
        if every > 0 and step > 0 and step % every == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """Score the raw (and EMA) weights at the current step on every rank; rank 0 logs and returns the records."""
        started = time.perf_counter()
        step = self._last_step = trainer.global_step
        if self._held_out is None:
            self._held_out = _HeldOutData.load(self, trainer, pl_module)
        held = self._held_out
        use_ema = self.settings.ema and getattr(pl_module, "ema", None) is not None
        if use_ema and not plan_for(trainer.strategy).samples_on_rank_zero:
            use_ema = False
            if trainer.global_rank == 0 and not self._said_raw_only:
                LOGGER.info("validation: ZeRO-3 partitions the weights, so only the raw weights are scored (no EMA)")
            self._said_raw_only = True
        was_training = pl_module.training
        pl_module.eval()
        records = []
        try:
            for weights in ("raw", "ema") if use_ema else ("raw",):
                context = pl_module.ema_applied(True) if weights == "ema" else nullcontext(pl_module.model)
                with torch.no_grad(), context as model:
                    loss, by_bucket = held.score(trainer, pl_module, model)
                records.append(
                    {
                        "step": step,
                        "weights": weights,
                        "loss": loss,
                        "loss_by_bucket": by_bucket,
                        "timesteps": held.timesteps,
                        "samples": held.samples,
                    }
                )
        finally:
            pl_module.train(was_training)
        if trainer.global_rank != 0:
            return []
        self._log(trainer, records, time.perf_counter() - started)
        return records

    def _log(self, trainer: pl.Trainer, records: list[dict[str, Any]], seconds: float) -> None:
        metrics = {}
        for record in records:
            name = "val/loss" if record["weights"] == "raw" else "val/ema_loss"
            metrics[name] = record["loss"]
            metrics.update({f"{name}_t{b}": value for b, value in enumerate(record["loss_by_bucket"])})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG_FILE, "a") as stream:
            stream.write("".join(json.dumps(r) + "\n" for r in records))
        ema = f", EMA {metrics['val/ema_loss']:.5f}" if "val/ema_loss" in metrics else ""
        first = records[0]
        LOGGER.info(
            f"validation step {first['step']}: loss {first['loss']:.5f}{ema} ({first['samples']} held-out samples x "
            f"{len(first['timesteps'])} timesteps, {seconds:.1f}s)"
        )


class _HeldOutData:
    """This rank's share of the held-out set, ready to score: latents (fp32, CPU) and conditioning inputs."""

    def __init__(self, timesteps: list[int], samples: int, keys: dict[int, str]) -> None:
        self.timesteps, self.samples, self.keys = timesteps, samples, keys
        self.latents: dict[int, Tensor] = {}
        self.inputs: dict[int, dict[str, Any]] = {}
        self.weights: dict[int, float] = {}  # index -> weight (0 for the stand-in of a rank without samples)
        self.batch_size = 1
        self.seed = 0

    @classmethod
    def load(cls, owner: ValidationLoss, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _HeldOutData:
        """Read (and encode) this rank's samples; the same selection and timesteps on every rank."""
        loss: DiffusionLoss = pl_module.loss_fn
        sampler = loss.noise_level_sampler
        timesteps = bucket_timesteps(sampler.t_min, sampler.t_max, owner.settings.timestep_buckets)
        errors: Counter = Counter()
        entries = select_held_out(owner.shards, owner.settings.max_samples, errors)
        rank, world = trainer.global_rank, trainer.world_size
        mine = [e for e in entries if e.index % world == rank]
        processor = held_out_processor(trainer.datamodule.loader.config.sample_processor(), owner.shards)
        read = read_held_out(owner.shards, mine, processor, owner.seed, errors)
        total = int(_all_reduce(torch.tensor([len(read)], device=pl_module.device), "sum").item())
        if total == 0:
            raise ValueError(
                f"validation: none of the {len(entries)} held-out samples of {describe_shards(owner.shards)} could be "
                f"read ({dict(errors) or 'no samples'}): check validation.shards (or the held-out shards of "
                "validation.holdout_fraction); they hold images, or cached latents made with this run's VAE"
            )
        weights = dict.fromkeys(read, 1.0)
        if not read:  # more ranks than samples (or none of its own readable): a stand-in, scored with weight 0
            read = next(r for r in (read_held_out(owner.shards, [e], processor, owner.seed) for e in entries) if r)
            weights = dict.fromkeys(read, 0.0)
        data = cls(timesteps, total, {e.index: e.key for e in entries if e.index in read})
        data.batch_size, data.seed, data.weights = owner.batch_size, owner.seed, weights
        data._encode(read, trainer, pl_module)
        if rank == 0 and errors:
            LOGGER.warning(f"validation: held-out samples skipped on rank 0: {dict(sorted(errors.items()))}")
        return data

    def _encode(self, read: dict[int, dict[str, Any]], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Latents of every sample: cached ones as they are, images through the VAE once (posterior mean x scale,
        fp32, autocast off as in training); every rank runs as many VAE calls (a rank with nothing repeats one)."""
        for index, batch in read.items():
            self.inputs[index] = {k: v for k, v in batch.items() if k not in (PIXELS, LATENTS, *BATCH_META_KEYS)}
            if LATENTS in batch:
                self.latents[index] = batch[LATENTS][0].float()
        pending = [i for i in read if i not in self.latents]
        groups = _chunks([(i, tuple(read[i][PIXELS].shape[1:])) for i in pending], self.batch_size)
        calls = int(_all_reduce(torch.tensor([len(groups)], device=pl_module.device), "max").item())
        model = pl_module.model
        vae_device = next(model.vae.parameters()).device
        vae_dtype = next(model.vae.parameters()).dtype
        for call in range(calls):
            group = groups[call] if call < len(groups) else (groups[0] if groups else None)
            if group is None:  # this rank has no images (cached latents, or none left): a same-size stand-in
                images = torch.zeros(1, 3, 64, 64, device=vae_device, dtype=vae_dtype)
            else:
                images = torch.cat([pixels_to_unit_range(read[i][PIXELS]) for i in group]).to(vae_device, vae_dtype)
            with torch.no_grad(), torch.autocast(device_type=vae_device.type, enabled=False):
                latents = model.encode_first_stage(images, sample=False).float().cpu()
            if group is not None and call < len(groups):
                self.latents.update({i: latents[n] for n, i in enumerate(group)})

    def _batches(self) -> list[list[tuple[int, int]]]:
        """(sample index, timestep range) pairs in batches of one latent shape, in a fixed order."""
        items = [
            ((i, b), tuple(self.latents[i].shape)) for i in sorted(self.weights) for b in range(len(self.timesteps))
        ]
        return _chunks(items, self.batch_size)

    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any) -> tuple[float, list[float]]:
        """(mean loss, mean loss per timestep range) over the whole held-out set (a collective: call on every rank)."""
        loss: DiffusionLoss = pl_module.loss_fn
        device, precision = pl_module.device, trainer.precision_plugin
        ranges = len(self.timesteps)
        sums = torch.zeros(ranges, dtype=torch.float64)
        counts = torch.zeros(ranges, dtype=torch.float64)
        batches = self._batches()
        calls = int(_all_reduce(torch.tensor([len(batches)], device=device), "max").item())
        sigma_table = loss.noise_level_sampler.sigmas
        for call in range(calls):
            batch = batches[call] if call < len(batches) else batches[0]  # a repeat with weight 0
            weight = torch.tensor(
                [self.weights[i] if call < len(batches) else 0.0 for i, _ in batch], dtype=torch.float64
            )
            latents = torch.stack([self.latents[i] for i, _ in batch]).to(device)
            noise = torch.stack(
                [fixed_noise(loss, self.latents[i].shape, self.seed, self.keys[i], b) for i, b in batch]
            )
            sigmas = sigma_table[torch.tensor([self.timesteps[b] for _, b in batch])].to(device)
            inputs = precision.convert_input(_to_device(stack_inputs([self.inputs[i] for i, _ in batch]), device))
            with precision.forward_context(), _whole(pl_module, model.conditioner):
                cond = model.condition(inputs)
                losses = loss.loss_at(model.unet, latents, cond, sigmas, noise.to(device))
            buckets = torch.tensor([b for _, b in batch])
            sums.index_add_(0, buckets, losses.detach().double().cpu() * weight)
            counts.index_add_(0, buckets, weight)
        totals = _all_reduce(torch.cat([sums, counts]).to(device), "sum").cpu()
        sums, counts = totals[:ranges], totals[ranges:]
        by_range = [s / c if c > 0 else math.nan for s, c in zip(sums.tolist(), counts.tolist())]
        return float(sums.sum() / counts.sum()), by_range


def _chunks(items: list[tuple[Any, tuple[int, ...]]], size: int) -> list[list[Any]]:
    """Items grouped by shape (shapes in sorted order, items in their order), cut into batches of `size`."""
    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for item, shape in items:
        by_shape.setdefault(shape, []).append(item)
    return [
        group[n : n + size]
        for shape in sorted(by_shape)
        for group in [by_shape[shape]]
        for n in range(0, len(group), size)
    ]


@contextmanager
def _whole(pl_module: pl.LightningModule, module: torch.nn.Module) -> Iterator[None]:
    """`module`'s parameters whole while the block runs: ZeRO-3 gathers them (a collective; the text encoders read
    some weights outside their own forward, which ZeRO-3's hooks would not gather), elsewhere nothing happens."""
    plan = getattr(pl_module, "plan", None)
    if plan is None:
        yield
        return
    chunks = plan.whole_parameters(list(module.named_parameters()), chunk_numel=1 << 62)  # one chunk: all of them
    try:
        for _ in chunks:
            yield
    finally:
        chunks.close()


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def _all_reduce(tensor: Tensor, op: str) -> Tensor:
    """SUM or MAX over the ranks (in place) when running distributed; the tensor itself otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


def validation_callbacks(cfg: Any, plan: ValidationPlan) -> list[pl.Callback]:
    """[the ValidationLoss callback of a run] when it validates (run.py adds it to the trainer), else []."""
    if not plan.shards:
        return []
    batch_size = plan.settings.batch_size or int(cfg.data.batch_size)
    return [ValidationLoss(plan, cfg.run_dir, int(cfg.seed), batch_size)]

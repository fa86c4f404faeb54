"""FID, KID and CLIP score during training (the `eval_metrics:` block of configs/train.yaml).

Every `every_n_steps` optimizer steps and at the end, the run samples `num_samples` images with the EMA weights
(when it has them and `ema` is on) exactly as `python -m sgm.eval.metrics` does: image i is prompt i mod P from
noise seed seed + i, sampled by rank i mod world size, so the images do not depend on the number of ranks. Each
rank computes its images' Inception features and CLIP scores; rank 0 gathers them in image order, computes the
metrics against the reference features (computed once at the start, cached on disk by fingerprint), logs
`eval/fid`, `eval/kid`, `eval/kid_std`, `eval/clip_score` at the global step and appends a line to
`<run_dir>/metrics.jsonl`. Every file is checked when the trainer is built (one ConfigError naming the key),
not at step N. Not under ZeRO-3 (each rank holds a slice of the weights): evaluate the exported file there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from sgm.eval.metrics import EvalSettings, ProgressLine, eval_jobs, metrics_from_features, read_prompts, sample_images
from sgm.parallel import plan_for
from sgm.training.preflight import ConfigError
from sgm.training.progress import LOGGER

if TYPE_CHECKING:
    from sgm.eval.fid import FeatureStats

KEY = "eval_metrics"
METRICS_LOG = "metrics.jsonl"
LOGGED_NAMES = {"fid": "eval/fid", "kid_mean": "eval/kid", "kid_std": "eval/kid_std", "clip_score": "eval/clip_score"}


class EvalMetrics(pl.Callback):
    """Samples, scores and logs the metrics every `every_n_steps` steps and at the end (see the module doc)."""

    def __init__(
        self,
        run_dir: str | Path,
        prompts: list[str],
        settings: EvalSettings,
        every_n_steps: int,
        reference: str | list[str] | None = None,
        inception: str | None = None,
        clip_model: str | None = None,
        clip_weights: str | None = None,
        use_ema: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.run_dir, self.prompts, self.settings = Path(run_dir), list(prompts), settings
        self.every_n_steps, self.reference, self.use_ema = every_n_steps, reference, use_ema
        self.inception_path, self.clip_model, self.clip_weights = inception, clip_model, clip_weights
        self.cache_dir = cache_dir
        self.inception: torch.nn.Module | None = None
        self.clip: Any = None
        self.reference_features: Tensor | None = None
        self.reference_stats: FeatureStats | None = None  # of reference_features: computed once
        self.results: list[dict[str, Any]] = []
        self._last_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load the extractors (CPU; moved to the device only while scoring) and, on rank 0, the reference."""
        if self.inception_path is not None:
            from sgm.eval.inception import InceptionFeatures

            self.inception = InceptionFeatures(self.inception_path, option=f"{KEY}.inception")
        if self.clip_model is not None:
            from sgm.eval.clip_score import CLIPScorer

            self.clip = CLIPScorer(self.clip_model, self.clip_weights, what=f"CLIP weights ({KEY}.clip_weights)")
        if self.inception is not None and self.reference is not None and trainer.global_rank == 0:
            from sgm.eval.reference import reference_features

            LOGGER.info(f"eval metrics: reference features of {self.reference} (cached after the first run)")
            with _on(self.inception, pl_module.device):
                self.reference_features = reference_features(
                    self.reference,
                    self.inception,
                    size=min(self.settings.height, self.settings.width),
                    max_images=self.settings.max_reference_images,
                    cache_dir=self.cache_dir,
                )
            from sgm.eval.fid import FeatureStats

            self.reference_stats = FeatureStats.from_features(self.reference_features)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """One evaluation at the current step on every rank; rank 0 returns (and records) the metrics."""
        self._last_step = step = trainer.global_step
        rank, world = trainer.global_rank, trainer.world_size
        total = len(eval_jobs(self.prompts, self.settings))
        ema = self.use_ema and getattr(pl_module, "ema", None) is not None
        weights = pl_module.ema_applied(ema) if hasattr(pl_module, "ema_applied") else nullcontext(pl_module.model)
        share = f" (rank 0's share of {total})" if world > 1 else ""
        progress = ProgressLine(math.ceil(total / world), lambda line: LOGGER.info(line + share)) if rank == 0 else None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with weights as model, torch.autocast(device_type=pl_module.device.type, enabled=False):
                images, prompts = sample_images(
                    model, self.prompts, self.settings, rank, world, getattr(pl_module, "denoiser", None), progress
                )
        finally:
            pl_module.train(was_training)
        features = scores = None
        if self.inception is not None:
            with _on(self.inception, pl_module.device):
                features = self.inception(images).double()
            features = gather_in_job_order(trainer, features.to(pl_module.device), total)
        if self.clip is not None:
            with _on(self.clip, pl_module.device):
                scores = self.clip.score(images, prompts)
            scores = gather_in_job_order(trainer, scores.to(pl_module.device), total)
        if rank != 0:
            return None
        metrics = metrics_from_features(features, scores, self.reference_features, self.reference_stats)
        record = {"step": step, "weights": "ema" if ema else "raw", **metrics}
        self.results.append(record)
        logged = {LOGGED_NAMES[k]: v for k, v in metrics.items() if k in LOGGED_NAMES}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_LOG, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        LOGGER.info("eval metrics at step %d (%s weights): %s", step, record["weights"], _describe(metrics))
        return record


def gather_in_job_order(trainer: pl.Trainer, local: Tensor, total: int) -> Tensor:
    """Every rank's rows (rank r holds images r, r + W, ...) as one CPU tensor in image order (on rank 0; every
    rank must call it)."""
    world = trainer.world_size
    if world == 1:
        return local.cpu()
    gathered = trainer.strategy.all_gather(pad_share(local, total, world))  # [world, per_rank, ...]
    return in_job_order(gathered, total).cpu()


def pad_share(local: Tensor, total: int, world_size: int) -> Tensor:
    """A rank's rows padded with zeros to ceil(total / world_size): all-gather needs one shape on every rank."""
    padded = local.new_zeros((math.ceil(total / world_size), *local.shape[1:]))
    padded[: len(local)] = local
    return padded


def in_job_order(gathered: Tensor, total: int) -> Tensor:
    """[world, per_rank, ...] padded shares -> [total, ...] in image order (image i is row i // W of rank i % W)."""
    world = gathered.shape[0]
    return torch.stack([gathered[i % world, i // world] for i in range(total)])


@contextmanager
def _on(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """`module` on `device` for a block, back on the CPU after (extractors sit on the CPU between uses)."""
    try:
        yield module.to(device)
    finally:
        module.to("cpu")


def _describe(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


# -- from the config ---------------------------------------------------------------------------------------
def build_eval_callback(cfg: DictConfig, run_dir: Path, strategy: Any = None) -> EvalMetrics | None:
    """The callback of cfg.eval_metrics, or None when it is off (every_n_steps 0) or under ZeRO-3; every path
    is checked here, at start-up: a ConfigError names the key and the fix."""
    spec = cfg.get(KEY)
    if not spec or not spec.get("every_n_steps"):
        return None
    every = spec.every_n_steps
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ConfigError(
            f"{KEY}.every_n_steps", f"must be an integer >= 0 (0: off), got {every!r}", f"{KEY}.every_n_steps=500"
        )
    settings = eval_settings(cfg)
    check_extractor_files(spec)
    prompts = eval_prompts(cfg, settings)
    if not plan_for(strategy).samples_on_rank_zero:
        if rank_zero_only.rank == 0:
            LOGGER.info("ZeRO-3: no eval metrics during training; run python -m sgm.eval.metrics on the exported file")
        return None
    return EvalMetrics(
        run_dir,
        prompts,
        settings,
        every,
        reference=_plain(spec.get("reference")),
        inception=spec.get("inception"),
        clip_model=spec.get("clip_model"),
        clip_weights=spec.get("clip_weights"),
        use_ema=bool(spec.get("ema", True)),
        cache_dir=spec.get("cache_dir"),
    )


def _plain(value: Any) -> Any:
    """A config list as a Python list (a reference given as several shard patterns); other values as they are."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value


def eval_settings(cfg: DictConfig) -> EvalSettings:
    """EvalSettings from cfg.eval_metrics; null height/width/guidance_scale take the `samples:` block's."""
    spec, samples = cfg[KEY], cfg.get("samples") or OmegaConf.create({})

    def pick(key: str, fallback: str, default: Any) -> Any:
        value = spec.get(key)
        return value if value is not None else samples.get(fallback, default)

    settings = EvalSettings(
        num_samples=spec.get("num_samples"),
        seed=int(spec.get("seed", 0)),
        height=pick("height", "height", 1024),
        width=pick("width", "width", 1024),
        num_steps=int(spec.get("num_steps", 20)),
        guidance_scale=float(pick("guidance_scale", "guidance_scale", 5.0)),
        batch_size=int(spec.get("batch_size", 4)),
        max_reference_images=spec.get("max_reference_images"),
    )
    try:
        settings.check()
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        key = f"{KEY}.{name}" if name in ("num_steps", "batch_size", "num_samples") else f"{KEY}.height"
        raise ConfigError(key, str(error), f"correct {key}") from None
    return settings


def check_extractor_files(spec: DictConfig) -> None:
    """The extractor settings fit together and their files exist (the Inception file is not loaded here)."""
    from sgm.eval.clip_score import CLIP_WEIGHTS_HOW_TO_GET, CLIPModelError, clip_config
    from sgm.eval.inception import inception_how_to_get

    inception, reference = spec.get("inception"), spec.get("reference")
    clip_model, clip_weights = spec.get("clip_model"), spec.get("clip_weights")
    if inception is None and clip_model is None:
        raise ConfigError(
            KEY,
            "every_n_steps is set but no metric is: set inception and reference (FID/KID) and/or clip_model and "
            "clip_weights (CLIP score)",
            f"{KEY}.inception=/path/to/weights-inception-2015-12-05-6726825d.pth {KEY}.reference=/path/to/images, "
            f"or {KEY}.every_n_steps=0",
        )
    if (inception is None) != (reference is None):
        missing = "reference" if reference is None else "inception"
        raise ConfigError(f"{KEY}.{missing}", "FID/KID need both inception and reference", f"set {KEY}.{missing}")
    if (clip_model is None) != (clip_weights is None):
        missing = "clip_weights" if clip_weights is None else "clip_model"
        raise ConfigError(
            f"{KEY}.{missing}", "the CLIP score needs clip_model and clip_weights", f"set {KEY}.{missing}"
        )
    if inception is not None and not Path(inception).is_file():
        raise ConfigError(f"{KEY}.inception", f"no such file: {inception}", inception_how_to_get())
    if reference is not None and not (isinstance(reference, str) and Path(reference).is_dir()):
        from sgm.data.shard_list import expand_shards

        try:
            expand_shards(reference if isinstance(reference, str) else [str(item) for item in reference])
        except ValueError as error:
            raise ConfigError(
                f"{KEY}.reference", f"neither a folder of images nor image shards ({error})", "a folder or shard glob"
            ) from None
    if clip_model is not None:
        try:
            clip_config(clip_model)
        except CLIPModelError as error:
            raise ConfigError(f"{KEY}.clip_model", str(error), f"{KEY}.clip_model=ViT-L-14") from None
        if not Path(clip_weights).is_file():
            raise ConfigError(f"{KEY}.clip_weights", f"no such file: {clip_weights}", CLIP_WEIGHTS_HOW_TO_GET)


def eval_prompts(cfg: DictConfig, settings: EvalSettings) -> list[str]:
    """cfg.eval_metrics.prompts (a text file or caption shards), or the `samples:` block's prompts when null."""
    source = cfg[KEY].get("prompts")
    if source is None:
        prompts = list((cfg.get("samples") or {}).get("prompts") or [])
        if not prompts:
            raise ConfigError(
                f"{KEY}.prompts", "not set, and samples.prompts is empty", f"{KEY}.prompts=/path/to/prompts.txt"
            )
        return prompts
    try:
        return read_prompts(source, settings.num_samples)
    except ValueError as error:
        raise ConfigError(
            f"{KEY}.prompts", str(error), "a text file with one prompt per line, or caption shards"
        ) from None

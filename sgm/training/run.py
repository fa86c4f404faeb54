"""One training run from a composed config: build the pieces, fit, export, report where things went."""

from __future__ import annotations

import glob
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sgm.diffusion.samplers import DPMPP2MSampler
from sgm.models.build import build_model
from sgm.training.callbacks import BatchKeyLog, SampleImages, ThroughputMonitor
from sgm.training.checkpoint_io import (
    AtomicCheckpointIO,
    SafeModelCheckpoint,
    check_fits_strategy,
    newest_checkpoint,
)
from sgm.training.datamodule import SDXLDataModule
from sgm.training.export import export_checkpoint
from sgm.training.lineage import load_pretrained, require_pretrained_file, write_lineage
from sgm.training.loggers import describe_logger
from sgm.training.preemption import Preempted, slurm_callbacks, slurm_plugins
from sgm.training.strategies import is_deepspeed_config, zero_stage

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ensure_demo_data(cfg: DictConfig) -> None:
    """Build the emoji demo shards when the config asks for them and none are there yet."""
    spec = cfg.get("demo_data")
    if not spec or glob.glob(os.path.join(str(spec.out), "*.tar")):
        return
    from data.build_demo_dataset import build_demo_dataset

    print(f"[sgm] building the demo dataset in {spec.out} ({spec.num_samples} samples)", flush=True)
    build_demo_dataset(spec.out, num_samples=int(spec.num_samples), num_emoji=spec.get("num_emoji"),
                       samples_per_shard=int(spec.get("samples_per_shard", 128)))


def resolve_resume(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    """resume=auto: the newest checkpoint of the run dir (None for a fresh run); else the path given."""
    resume = cfg.get("resume")
    if resume in (None, "null", "none", False):
        return None
    if resume == "auto":
        found = newest_checkpoint(checkpoint_dir)
        if found is None:
            return None
        resume = found
    if not Path(str(resume)).exists():  # a .ckpt file, or a DeepSpeed .ckpt directory
        raise FileNotFoundError(f"resume={resume}: no such checkpoint (use resume=auto or a .ckpt path)")
    check_fits_strategy(str(resume), is_deepspeed_config(cfg.trainer.get("strategy")))
    return str(resume)


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """The model from its config (+ the `pretrained_parts` of the `pretrained` file), in the training module.

    Built right after seeding with cfg.seed: the parts no file supplies (all of a tiny model's) come out
    the same in every rebuild (on resume, and in finish()'s export), so a run exports the frozen parts
    it trained with and its children inherit them."""
    if cfg.get("pretrained"):
        require_pretrained_file(cfg.pretrained)  # before building a model of billions of parameters
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.get("pretrained"):
        load_pretrained(model, cfg.pretrained, cfg.get("pretrained_parts"))
    return instantiate(cfg.module, model=model)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    checkpoints = SafeModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:06d}", auto_insert_metric_name=False,
                                  every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                                  save_top_k=cfg.checkpoint.save_top_k, save_last=True)  # fmt: skip
    s = cfg.samples
    samples = SampleImages(str(run_dir / "samples"), list(s.prompts), list(s.seeds), s.every_n_steps, s.height, s.width,
                           sampler=partial(DPMPP2MSampler, num_steps=s.num_steps), guidance_scale=s.guidance_scale,
                           at_train_end=s.get("at_train_end", True))  # fmt: skip
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    extra = [BatchKeyLog(str(run_dir / "batch_keys.tsv"))] if cfg.get("log_batch_keys") else []
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    if isinstance(trainer_kwargs.get("strategy"), dict):  # a `_target_` strategy (the DeepSpeed configs)
        trainer_kwargs["strategy"] = instantiate(trainer_kwargs["strategy"], _convert_="all")
    zero3 = zero_stage(trainer_kwargs.get("strategy")) == 3  # samples run on rank 0 alone: its partial weights hang
    if zero3 and rank_zero_only.rank == 0:
        print("[sgm] ZeRO-3: no validation samples during training; sample from the exported file", flush=True)
    return pl.Trainer(default_root_dir=str(run_dir), logger=logger, plugins=[AtomicCheckpointIO(), *slurm_plugins()],
                      callbacks=[checkpoints, *([] if zero3 else [samples]), ThroughputMonitor(), *extra, *slurm_callbacks(run_dir),
                                 *(extra_callbacks or [])],
                      **trainer_kwargs)  # fmt: skip


def job_run_dir(cfg: DictConfig) -> Path:
    """run_dir; in a Hydra multirun each job's own sweep folder instead, so sweep points never share checkpoints."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # the logger's ${run_dir} follows
    return Path(cfg.run_dir)


def run(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, str]:
    """Train as configured; returns (and prints, on rank 0) where each output went."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    run_dir = job_run_dir(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ensure_demo_data(cfg)
    ckpt_path = resolve_resume(cfg, run_dir / "checkpoints")
    module = build_module(cfg)
    datamodule = SDXLDataModule(instantiate(cfg.data))
    trainer = build_trainer(cfg, run_dir, extra_callbacks)
    if trainer.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_lineage(cfg, run_dir, module.model, resumed_from=ckpt_path)  # parent, its sha256, start weights
        if ckpt_path:
            print(f"[sgm] resuming from {ckpt_path}", flush=True)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Preempted:  # checkpointed and requeued: the requeued job resumes (resume=auto)
        return {}
    if trainer.global_rank != 0:
        return {}
    return finish(cfg, trainer, run_dir)


def finish(cfg: DictConfig, trainer: pl.Trainer, run_dir: Path) -> dict[str, str]:
    """Export the last checkpoint to the official layout and report the run's files."""
    last = newest_checkpoint(run_dir / "checkpoints")
    outputs: dict[str, str] = {"run_dir": str(run_dir), "config": str(run_dir / "config.yaml")}
    if last is not None:
        outputs["checkpoint"] = str(last)
        suffix = "unet" if cfg.export.unet_only else "full"
        with torch.random.fork_rng(devices=[]):  # the export rebuilds the model: same seed, same frozen parts
            torch.default_generator.manual_seed(cfg.seed)
            exported = export_checkpoint(last, run_dir / f"{cfg.name}_{suffix}.safetensors", cfg.model,
                                         use_ema=cfg.export.ema, dtype=DTYPES[cfg.export.dtype],
                                         unet_only=cfg.export.unet_only, pretrained=cfg.get("pretrained"),
                                         pretrained_parts=cfg.get("pretrained_parts"))  # fmt: skip
        outputs["export"] = f"{exported['path']} ({'EMA' if exported['ema'] else 'raw'} weights)"
    sampler = next((c for c in trainer.callbacks if isinstance(c, SampleImages)), None)
    if sampler is not None and sampler.written:
        outputs["samples"] = str(sampler.written[-1])
    logger = trainer.logger
    where = describe_logger(logger) if logger is not None else None
    if where:
        outputs["logs"] = where
    throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    if throughput is not None and throughput.images_per_second:
        rates = sorted(throughput.images_per_second)
        outputs["images_per_second_median"] = f"{rates[len(rates) // 2]:.1f}"
    outputs["global_step"] = str(trainer.global_step)
    (run_dir / "outputs.json").write_text(json.dumps(outputs, indent=2))
    for key, value in outputs.items():
        print(f"[sgm] {key}: {value}", flush=True)
    return outputs

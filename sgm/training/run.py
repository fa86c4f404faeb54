"""One training run from a composed config: build the pieces, fit, export, report where things went."""

from __future__ import annotations

import glob
import json
import os
import sys
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

from sgm.checkpoint.export import export_adapter, export_model
from sgm.checkpoint.io import SCALE_FACTOR_KEY, read_metadata
from sgm.checkpoint.lineage import read_lineage, restore_frozen, trained_groups, write_lineage
from sgm.checkpoint.model_source import RUN_CONFIG, run_dir_of
from sgm.checkpoint.pretrained import load_pretrained, require_pretrained_file
from sgm.diffusion.samplers import DPMPP2MSampler
from sgm.models.build import build_model
from sgm.parallel import check_fits_strategy, newest_checkpoint, plan_for
from sgm.training.callbacks import (
    BatchKeyLog,
    CheckpointOnBadData,
    RemoveReshardedCopy,
    SampleImages,
    ThroughputMonitor,
)
from sgm.training.checkpoint_io import AtomicCheckpointIO, SafeModelCheckpoint
from sgm.training.datamodule import SDXLDataModule
from sgm.training.eval_callback import build_eval_callback
from sgm.training.loggers import describe_logger
from sgm.training.preemption import Preempted, slurm_callbacks, slurm_plugins
from sgm.training.preflight import (
    ConfigError,
    check_config,
    check_data,
    check_resume,
    check_resume_layout,
    hydra_context,
    user_errors,
)
from sgm.training.progress import (
    LOGGER,
    ProgressLog,
    attach_log_file,
    console_logging,
    detach_log_file,
    progress_interval,
)
from sgm.training.summary import run_summary
from sgm.training.validation import validation_callbacks
from sgm.training.validation_split import validation_plan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ensure_demo_data(cfg: DictConfig) -> None:
    """Build the emoji demo shards when the config asks for them and none are there yet, and their held-out
    set (demo_data.val_samples, in <out>/val) when it is missing or of another size (also beside shards
    built before the demo had one)."""
    spec = cfg.get("demo_data")
    if not spec:
        return
    from sgm.data.demo_dataset import VAL_FOLDER, build_demo_dataset, build_demo_val_shards

    common = {"num_emoji": spec.get("num_emoji"), "samples_per_shard": int(spec.get("samples_per_shard", 128))}
    val_samples = int(spec.get("val_samples") or 0)
    if not glob.glob(os.path.join(str(spec.out), "*.tar")):
        LOGGER.info(f"building the demo dataset in {spec.out} ({spec.num_samples} samples)")
        build_demo_dataset(spec.out, num_samples=int(spec.num_samples), val_samples=val_samples, **common)
        return
    summary = Path(str(spec.out)) / VAL_FOLDER / "_build_summary.json"
    if val_samples and (not summary.is_file() or json.loads(summary.read_text()).get("written") != val_samples):
        LOGGER.info(f"building the demo's held-out set in {summary.parent} ({val_samples} samples)")
        build_demo_val_shards(spec.out, val_samples, **common)


def ensure_demo_vae(cfg: DictConfig, resume_from: str | None) -> None:
    """The demo's trained VAE (demo_vae; sgm.training.demo_vae): trained once on the demo shards, then reused.
    The run starts from it as from any file: pretrained=<it> pretrained_parts=[vae] (lineage.json records it;
    its latent scale factor comes from the file, adopt_pretrained_latent_scale). A resume takes the two from its
    run's config.yaml instead: the VAE it trained with, whatever demo_vae says now (the resume check lists a
    changed demo_vae)."""
    spec = cfg.get("demo_vae")
    if not spec:
        return
    recorded = run_dir_of(Path(resume_from)) if resume_from else None
    if recorded is not None:
        started = OmegaConf.load(recorded / RUN_CONFIG)
        cfg.pretrained, cfg.pretrained_parts = started.get("pretrained"), started.get("pretrained_parts")
        return
    if cfg.get("pretrained"):
        raise ConfigError(
            "demo_vae",
            f"the demo trains its own VAE, and pretrained={cfg.pretrained} would give the model another",
            "demo_vae=null to start from the file (or drop pretrained)",
        )
    from sgm.training.demo_vae import describe, ensure_vae

    try:
        vae = ensure_vae(cfg, spec)
    except ValueError as error:
        raise ConfigError("demo_vae", str(error), "demo_vae: {out, steps, lr, patch_size, batch_size, ...}") from None
    LOGGER.info(describe(vae))
    cfg.pretrained, cfg.pretrained_parts = str(vae.path), ["vae"]


def adopt_pretrained_latent_scale(cfg: DictConfig) -> None:
    """A pretrained file whose VAE was trained here records its latent scale factor (metadata sgm.scale_factor: an
    export, the VAE trainer's file): a run taking that VAE uses it, as sampling the file does (a config's default,
    SDXL's 0.13025, would mis-scale its latents). Released files carry none and change nothing."""
    pretrained, parts = cfg.get("pretrained"), cfg.get("pretrained_parts")
    path = Path(str(pretrained)) if pretrained else None
    if (
        path is None
        or path.suffix != ".safetensors"
        or not path.is_file()
        or (parts is not None and "vae" not in parts)
    ):
        return
    scale = read_metadata(path).get(SCALE_FACTOR_KEY)
    if scale and float(scale) != float(cfg.model.scale_factor):
        LOGGER.info(f"model.scale_factor={float(scale)}: the latent scale of {path}'s VAE (its metadata)")
        cfg.model.scale_factor = float(scale)


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
    if not Path(str(resume)).exists():  # a .ckpt file, or a sharded .ckpt directory
        raise FileNotFoundError(f"resume={resume}: no such checkpoint (use resume=auto or a .ckpt path)")
    check_fits_strategy(str(resume), cfg.trainer.get("strategy"))
    return str(resume)


def build_module(cfg: DictConfig, resume_from: str | None = None) -> pl.LightningModule:
    """The model from its config in the training module: fresh, or the frozen parts of the run it resumes.

    A fresh start builds the model under cfg.seed and loads the `pretrained_parts` of the `pretrained`
    file. A resume takes every frozen part from the source its run recorded (lineage.json: the parent
    file or the run's frozen_parts.safetensors), checked against the fingerprints taken at the start; the
    trained parts then come from the checkpoint."""
    if cfg.get("pretrained"):
        require_pretrained_file(cfg.pretrained)  # before building a model of billions of parameters
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    source_run = run_dir_of(Path(resume_from)) if resume_from else None
    record = read_lineage(source_run) if source_run else None
    if record is not None:
        restore_frozen(model, source_run, record, skip=record.get("trained") or ())
    elif cfg.get("pretrained"):
        load_pretrained(model, cfg.pretrained, cfg.get("pretrained_parts"))
    return instantiate(cfg.module, model=model, seed=cfg.seed)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    checkpoints = SafeModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        save_top_k=cfg.checkpoint.save_top_k,
        save_last=True,
    )
    s = cfg.samples
    samples = SampleImages(
        str(run_dir / "samples"),
        list(s.prompts),
        list(s.seeds),
        s.every_n_steps,
        s.height,
        s.width,
        sampler=partial(DPMPP2MSampler, num_steps=s.num_steps),
        guidance_scale=s.guidance_scale,
        at_train_end=s.get("at_train_end", True),
    )
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    extra = [BatchKeyLog(str(run_dir / "batch_keys.tsv"))] if cfg.get("log_batch_keys") else []
    progress = ProgressLog(
        progress_interval(OmegaConf.select(cfg, "progress.every_n_steps", default="auto"), cfg.trainer.max_steps)
    )
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    if isinstance(trainer_kwargs.get("strategy"), dict):  # a `_target_` strategy (the sharded configs)
        trainer_kwargs["strategy"] = instantiate(trainer_kwargs["strategy"], _convert_="all")
    sharded = not plan_for(trainer_kwargs.get("strategy")).samples_on_rank_zero  # samples run on rank 0 alone
    evaluation = build_eval_callback(cfg, run_dir, trainer_kwargs.get("strategy"))  # checks its files now
    if sharded and rank_zero_only.rank == 0:
        LOGGER.info("ZeRO-3: no validation samples during training; sample from the exported file")
    return pl.Trainer(
        default_root_dir=str(run_dir),
        logger=logger,
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
        callbacks=[
            checkpoints,
            *([] if sharded else [samples]),
            *([evaluation] if evaluation else []),
            ThroughputMonitor(),
            CheckpointOnBadData(run_dir / "checkpoints" / "stopped_bad_data.ckpt"),
            *extra,
            *slurm_callbacks(run_dir),
            *(extra_callbacks or []),
            progress,
        ],
        **trainer_kwargs,
    )


def job_run_dir(cfg: DictConfig) -> Path:
    """run_dir; in a Hydra multirun each job's own sweep folder instead, so sweep points never share checkpoints."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # the logger's ${run_dir} follows
    return Path(cfg.run_dir)


def main_entry(cfg: DictConfig) -> None:
    """The entry point's body (sgm.train, train.py): run(cfg); a mistake in the settings or files ends in one
    message on stderr and exit code 2, without a traceback (SGM_TRACEBACK=1 shows it)."""
    try:
        run(cfg)
    except user_errors() as error:
        if os.environ.get("SGM_TRACEBACK"):
            raise
        print(f"[sgm] error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, str]:
    """Train as configured; returns (and prints, on rank 0) where each output went.

    Everything that can be checked is checked before the run directory is touched (sgm.training.preflight:
    the settings, the data, what a resume would continue); a run that stops there, or has nothing left
    to train, leaves an existing run as it was."""
    console_logging()
    check_config(cfg, *hydra_context())
    run_dir = job_run_dir(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ensure_demo_data(cfg)
    check_data(cfg)
    try:
        ckpt_path = resolve_resume(cfg, run_dir / "checkpoints")
    except ValueError as error:  # a checkpoint of the wrong kind for the strategy (the message names the fix)
        raise ConfigError("resume", str(error)) from None
    ensure_demo_vae(cfg, ckpt_path)  # sets pretrained (the demo's trained VAE) before the resume check compares it
    adopt_pretrained_latent_scale(cfg)  # ... and the scale factor of the VAE it names
    check_resume(cfg, ckpt_path)
    check_resume_layout(cfg, ckpt_path)
    validation = validation_plan(cfg, ckpt_path)  # the held-out shards; training reads validation.train_data
    done = finished_outputs(cfg, run_dir, ckpt_path)
    if done is not None:
        return done
    module = build_module(cfg, ckpt_path)
    datamodule = SDXLDataModule(
        instantiate(validation.train_data or cfg.data),
        reshard=bool(cfg.get("resume_reshard")),
        allow_changes=bool(cfg.get("resume_allow_changes")),
    )
    resharding = RemoveReshardedCopy(run_dir / "checkpoints") if ckpt_path and cfg.get("resume_reshard") else None
    callbacks = [
        *(extra_callbacks or []),
        *([resharding] if resharding else []),
        *validation_callbacks(cfg, validation),
    ]
    trainer = build_trainer(cfg, run_dir, callbacks)
    fit_path = ckpt_path
    if resharding is not None:  # maybe another world size: the plan says what loads there
        fit_path = str(plan_for(trainer.strategy).reshard_for_resume(ckpt_path, trainer.world_size))
        resharding.copy = Path(fit_path) if fit_path != ckpt_path else None
    log_file = None
    if trainer.global_rank == 0:
        log_file = start_run_dir(cfg, run_dir)
        write_lineage(
            cfg,
            run_dir,
            module.model,
            resumed_from=ckpt_path,  # parent, frozen parts, fingerprints
            trained=trained_groups(module.state_dict()),
        )
        if ckpt_path:
            LOGGER.info(f"resuming from {ckpt_path}")
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=fit_path)
        except Preempted:  # checkpointed and requeued: the requeued job resumes (resume=auto)
            return {}
        if trainer.global_rank != 0:
            return {}
        return finish(cfg, trainer, run_dir)
    finally:
        detach_log_file(log_file)


def start_run_dir(cfg: DictConfig, run_dir: Path) -> Any:
    """Once the checks passed, on rank 0: the run dir with config.yaml (resolved), Hydra's record of the
    command (.hydra/overrides.yaml, hydra.yaml) and train.log; returns the log's handler."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create(list(hydra.overrides.task)), run_dir / ".hydra" / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra)}), run_dir / ".hydra" / "hydra.yaml")
    return attach_log_file(run_dir / "train.log")


def finished_outputs(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> dict[str, str] | None:
    """The recorded outputs of a run that already reached trainer.max_steps (its outputs.json is newer than
    the checkpoint it would resume), after saying so; None when there is something to train."""
    record = run_dir / "outputs.json"
    if ckpt_path is None or not record.is_file() or record.stat().st_mtime_ns < Path(ckpt_path).stat().st_mtime_ns:
        return None
    outputs = json.loads(record.read_text())
    if int(outputs.get("global_step", -1)) < cfg.trainer.max_steps:
        return None
    if rank_zero_only.rank == 0:
        LOGGER.info(
            f"{run_dir} already trained to step {outputs['global_step']} (trainer.max_steps="
            f"{cfg.trainer.max_steps}): nothing to train. trainer.max_steps=<more> continues it, "
            "name=<new run> starts another"
        )
    return outputs


def trains_in_full(cfg: DictConfig) -> bool:
    """Whether module.trainable trains any part's own weights (mode full, the default), not only adapters."""
    parts = OmegaConf.to_container(cfg.module.get("trainable") or {"unet": None}, resolve=True)
    return any((settings or {}).get("mode", "full") == "full" for settings in parts.values())


def finish(cfg: DictConfig, trainer: pl.Trainer, run_dir: Path) -> dict[str, str]:
    """Export the last checkpoint to the official layout and report the run's files."""
    last = newest_checkpoint(run_dir / "checkpoints")
    outputs: dict[str, str] = {"run_dir": str(run_dir), "config": str(run_dir / "config.yaml")}
    if last is not None:
        outputs["checkpoint"] = str(last)
        adapter = export_adapter(
            last,
            run_dir / f"{cfg.name}_lora.safetensors",
            weights="ema" if cfg.export.ema else "raw",
            dtype=DTYPES[cfg.export.dtype],
        )
        if adapter is not None:
            weights = "EMA" if adapter["weights"] == "ema" else "raw"
            outputs["lora"] = f"{adapter['path']} ({adapter['modules']} modules, {weights} weights, kohya format)"
    if last is not None and trains_in_full(cfg):  # a LoRA-only run's model is its base: `lora` above is the output
        suffix = "unet" if cfg.export.unet_only else "full"
        exported = export_model(
            last,
            run_dir / f"{cfg.name}_{suffix}.safetensors",
            weights="ema" if cfg.export.ema else "raw",
            dtype=DTYPES[cfg.export.dtype],
            parts=("unet",) if cfg.export.unet_only else ("unet", "text_encoders", "vae"),
        )
        outputs["export"] = f"{exported['path']} ({'EMA' if exported['weights'] == 'ema' else 'raw'} weights)"
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
    for key, value in outputs.items():  # through the "sgm" logger: the console and train.log
        LOGGER.info(f"{key}: {value}")
    for line in run_summary(run_dir, outputs):  # the evidence: held-out loss first -> last, the grid, the VAE
        LOGGER.info(line)
    return outputs

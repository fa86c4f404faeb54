"""The LightningModule: trains the parts of an SDXL model that `module.trainable` names (by default the UNet).

Parts outside the trainable set (sgm/training/trainable.py), the VAE and by default the text encoders:
eval mode, no grads, not in the optimizer or the EMA and, by default, not in the training checkpoint
(`state_dict` keeps the trained parts, their EMA and the denoiser's table). The frozen parts come from
the sources the run recorded (sgm/checkpoint/lineage.py), on resume and in every later load.
What differs between strategies (wrapping, sharded weights, steps) is the parallel plan's business (sgm/parallel).

Randomness is a function of the batch, not of history: every draw a training batch makes (the VAE
posterior sample, the noise level and noise, caption and embedding dropout, dropout layers) comes from
the global RNGs reseeded for that batch from (seed, rank, index of the batch in the run), inside a fork
that leaves the RNGs outside the step as they were. The index is saved in every checkpoint
(`sgm_batches_trained`), so a resumed run draws what the uninterrupted run drew at the same batch: with
the loader's position, the optimizer, LR-schedule and EMA state, it trains the same steps bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from hashlib import sha256
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from sgm.checkpoint.training_ckpt import EMA_PREFIX, MODEL_PREFIX, upgrade_legacy_ema
from sgm.diffusion.denoiser import DiscreteDenoiser
from sgm.diffusion.loss import DiffusionLoss
from sgm.models.conditioner import CACHED_EMBEDDINGS
from sgm.models.sdxl import SDXL
from sgm.parallel import ParallelPlan, plan_for
from sgm.training.ema import EMA
from sgm.training.lr import warmup_schedule
from sgm.training.optim import build_optimizer, check_optimizer_name
from sgm.training.trainable import TrainableSet

BATCH_META_KEYS = ("__key__", "__url__")
BATCHES_TRAINED = "sgm_batches_trained"  # checkpoint key: training batches (micro-batches) run so far


def batch_seed(seed: int, rank: int, index: int) -> int:
    """The seed of training batch `index` on `rank` (63 bits): independent streams per rank and batch."""
    digest = sha256(f"sgm-batch:{seed}:{rank}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps in a row were skipped for a NaN/inf loss."""


def pixels_to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] in [0, 255] -> float32 in [-1, 1] (the VAE's input range)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"batch['jpg'] must be uint8 pixels from the loader, got {pixels.dtype}")
    return pixels.float().div_(127.5).sub_(1.0)


class SDXLTrainingModule(pl.LightningModule):
    """Training of an SDXL model's trainable set: VAE encode, conditioner with CFG dropout, DiffusionLoss."""

    def __init__(
        self,
        model: SDXL,
        denoiser: DiscreteDenoiser,
        loss: Callable[[DiscreteDenoiser], DiffusionLoss],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        eps: float = 1e-8,
        optimizer: str = "adamw",
        optimizer_kwargs: Mapping[str, Any] | None = None,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        ema_decay: float | None = None,
        gradient_checkpointing: bool | None = None,
        compile: bool = False,
        max_nonfinite_in_row: int = 5,
        save_frozen_parts: bool = False,
        offload_frozen: bool = False,
        trainable: TrainableSet | Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        """`loss` is a partial of DiffusionLoss missing its denoiser (the module owns the denoiser,
        so its `sigmas` table moves with the module). `ema_decay=None` turns the EMA off.
        `offload_frozen` keeps the frozen VAE and text encoders on the CPU once fit starts (they then only
        embed sample prompts and decode samples): for cached latents + text embeddings on a small GPU.
        `trainable`: the parts that train and their lr / weight decay (`module.trainable`; None: the UNet).
        `seed`: the run's seed, from which each training batch's randomness is drawn (see the module docstring)."""
        super().__init__()
        self.model = model
        self.trainable = trainable if isinstance(trainable, TrainableSet) else TrainableSet(trainable)
        self.trainable.apply(self.model)  # freezes everything else; an unknown part name fails here
        # LoRA parts: adapters hooked into the frozen base (checkpoint keys adapters.<kohya name>.*), or None
        self.adapters = self.trainable.attach_adapters(self.model)
        self.plan: ParallelPlan = ParallelPlan()  # the strategy's plan, from the trainer in setup()
        self.denoiser = denoiser
        self.loss_fn = loss(denoiser=denoiser)
        self.lr, self.betas, self.weight_decay, self.eps = lr, tuple(betas), weight_decay, eps
        check_optimizer_name(optimizer)  # a typo fails here, not at the first step
        self.optimizer_name, self.optimizer_kwargs = optimizer, dict(optimizer_kwargs or {})
        self.warmup_steps, self.lr_schedule, self.min_lr_ratio = warmup_steps, lr_schedule, min_lr_ratio
        warmup_schedule(warmup_steps, lr_schedule, 10**9 if lr_schedule == "cosine" else None)  # validate early
        if gradient_checkpointing is not None:
            self.model.unet.set_gradient_checkpointing(gradient_checkpointing)
        # The EMA is a plain attribute, not a submodule: a strategy may cast the module's parameters (bf16) and
        # shard them. state_dict, load_state_dict and _apply carry it instead.
        self.__dict__["ema"] = EMA(self.trained_parameters(), ema_decay) if ema_decay is not None else None
        self._ema_from_weights_at_start = False
        if compile:  # after the EMA copy; in place, so parameter names (and checkpoints) stay the same
            self.model.unet.compile()
        if max_nonfinite_in_row < 1:
            raise ValueError(f"max_nonfinite_in_row must be >= 1, got {max_nonfinite_in_row}")
        self.max_nonfinite_in_row = max_nonfinite_in_row
        self.save_frozen_parts = save_frozen_parts
        self.offload_frozen = offload_frozen
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.seed, self.batches_trained = int(seed), 0

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(state_dict key, parameter) of every parameter that trains: what the EMA averages."""
        return self.trainable.named_parameters(self.model)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The trained parts (+ their EMA as `ema.<key>`, the denoiser table) only, unless save_frozen_parts:
        the frozen parts come from the sources the run recorded (lineage.json)."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        if not self.save_frozen_parts:
            kept = self.trainable.state_prefixes(self.model, prefix=f"{prefix}model.")
            for key in [k for k in full if k.startswith(f"{prefix}model.") and not k.startswith(kept)]:
                del full[key]  # in place: a parent module's `destination` is this same dict
        if self.ema is not None:  # outside the module tree (see __init__), under "ema.<key>"
            full.update(self.ema.state_dict(prefix=f"{prefix}{EMA_PREFIX}", keep_vars=kwargs.get("keep_vars", False)))
        return full

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """A training checkpoint: frozen parts may be absent (this module has them from its config); the
        EMA is restored, started from the loaded weights when the checkpoint has none, or ignored when off."""
        state = upgrade_legacy_ema(dict(state_dict))
        ema_state = {k.removeprefix(EMA_PREFIX): state.pop(k) for k in list(state) if k.startswith(EMA_PREFIX)}
        result = super().load_state_dict(state, strict=False, assign=assign)
        kept = self.trainable.state_prefixes(self.model)
        missing = [k for k in result.missing_keys if not k.startswith(MODEL_PREFIX) or k.startswith(kept)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"the checkpoint does not fit this model: {len(missing)} missing keys {missing[:3]}, "
                f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}; resume with the run's model config"
            )
        if self.ema is not None and ema_state:
            self.ema.load_state_dict(ema_state, strict=strict)
        elif self.ema is not None:  # EMA switched on mid-run: start it from the weights
            if self.plan.weights_restored_after_load:
                self._ema_from_weights_at_start = True  # the strategy restores the weights later (ZeRO-3)
            else:
                self.ema.copy_from(self.trained_parameters(), gather=self.plan.whole_parameters)
        return result._replace(missing_keys=missing)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> SDXLTrainingModule:
        """Moves and casts (.to, .cuda, .float) reach the EMA too, which is kept outside the module tree."""
        super()._apply(fn, recurse)
        if getattr(self, "ema", None) is not None:
            self.ema._apply(fn, recurse)
        return self

    def setup(self, stage: str) -> None:
        """Take the strategy's plan and let it adapt the model before the strategy wraps it."""
        self.plan = plan_for(self.trainer.strategy)
        self.plan.prepare_model(self.model)

    def on_train_start(self) -> None:
        if self._ema_from_weights_at_start:
            self.ema.copy_from(self.trained_parameters(), gather=self.plan.whole_parameters)  # every rank
            self._ema_from_weights_at_start = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The skipped-step count, and a check that the checkpoint trained the same parts; the weights are
        restored by load_state_dict (or by the strategy)."""
        nonfinite = checkpoint.get("sgm_nonfinite_total")
        self.nonfinite_total = int(nonfinite or 0)
        batches = checkpoint.get(BATCHES_TRAINED)  # older checkpoints: one batch per step and rank
        accumulate = max(int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1), 1) if self._trainer else 1
        self.batches_trained = (
            int(batches) if batches is not None else int(checkpoint.get("global_step", 0)) * accumulate
        )
        saved = checkpoint.get("sgm_trainable") or ["unet"]  # older checkpoints trained the UNet (in full)
        modes = checkpoint.get("sgm_trainable_modes") or dict.fromkeys(saved, "full")
        if modes != self.trainable.modes:
            raise ValueError(
                f"the checkpoint trained {modes} but module.trainable says {self.trainable.modes}: resume "
                "with the run's module.trainable, or export the checkpoint and start a new run from the file "
                "(pretrained=out.safetensors name=...)"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sgm_nonfinite_total"] = self.nonfinite_total
        checkpoint["sgm_trainable"] = list(self.trainable.names)
        checkpoint["sgm_trainable_modes"] = self.trainable.modes
        checkpoint[BATCHES_TRAINED] = self.batches_trained

    # -- training ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> SDXLTrainingModule:
        """Lightning calls train() on the whole module: keep the frozen parts in eval mode."""
        super().train(mode)
        if "trainable" in self.__dict__:
            self.trainable.keep_frozen_in_eval(self.model)
        return self

    def encode(self, pixels: Tensor) -> Tensor:
        """uint8 pixels -> scaled latents: a posterior sample, fp32 with autocast off (SDXL's VAE overflows in fp16)."""
        images = pixels_to_unit_range(pixels)
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            vae_dtype = next(self.model.vae.parameters()).dtype
            return self.model.encode_first_stage(images.to(vae_dtype)).float()

    def on_fit_start(self) -> None:
        """Cached text embeddings: take the cache's empty-caption outputs for caption dropout; offload
        the frozen parts when asked (after the strategy moved the module to its device)."""
        loader = getattr(getattr(self.trainer, "datamodule", None), "loader", None)
        empty = loader.empty_caption_outputs() if hasattr(loader, "empty_caption_outputs") else None
        if empty:
            self.model.conditioner.set_empty_caption_outputs(empty)
        if self.offload_frozen:
            self.model.vae.to("cpu")
            trained = self.trainable.embedder_indices(self.model)
            for index in self.model.conditioner.text_embedder_indices():
                if index not in trained:
                    self.model.conditioner.embedders[index].to("cpu")

    def batch_latents(self, batch: Mapping[str, Any]) -> Tensor:
        """Cached latents when the loader gives them (LatentLoader: the VAE is skipped), else VAE-encoded pixels."""
        if self.offload_frozen and not ("latents" in batch and "cached_embeddings" in batch):
            raise ValueError(
                "module.offload_frozen=true keeps the VAE and text encoders on the CPU, so training needs cached "
                "latents and text embeddings (data=cached_latents, shards cached with --text-embeddings); "
                "set module.offload_frozen=false to train from images"
            )
        cached = set(map(str, batch.get(CACHED_EMBEDDINGS) or ()))
        trained = [i for i in self.trainable.embedder_indices(self.model) if str(i) in cached]
        if trained:
            raise ValueError(
                f"the batch has cached text embeddings of embedder(s) {trained}, which module.trainable trains: they "
                "must run on the captions; train them from shards without cached text embeddings"
            )
        if "latents" in batch:
            return batch["latents"].float()
        if "jpg" not in batch:
            raise KeyError(
                f"a training batch needs 'jpg' (image shards) or 'latents' (cached shards); got {sorted(batch)}"
            )
        return self.encode(batch["jpg"])

    @contextmanager
    def batch_randomness(self) -> Iterator[None]:
        """The RNGs seeded for the next training batch (see the module docstring), restored afterwards.
        Gradient checkpointing replays the forward's RNG state in the backward, so its draws match."""
        seed = batch_seed(self.seed, self.global_rank, self.batches_trained)
        self.batches_trained += 1
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        with self.batch_randomness():
            return self._train_batch(batch)

    def _train_batch(self, batch: Mapping[str, Any]) -> Tensor | None:
        latents = self.batch_latents(batch)
        cond_batch = {k: v for k, v in batch.items() if k not in ("jpg", "latents", *BATCH_META_KEYS)}
        cond = self.model.condition(cond_batch, apply_dropout=True)
        losses = self.loss_fn(self.model.unet, latents, cond)
        loss = losses.mean()
        batch_size = latents.shape[0]
        if not self._all_ranks_finite(loss):
            return self._skip_step(batch_size)
        self.nonfinite_in_row = 0
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        self.log("train/nonfinite_skipped", float(self.nonfinite_total), batch_size=batch_size)
        return loss

    def _all_ranks_finite(self, loss: Tensor) -> bool:
        """One decision for every rank: a step skipped on one rank only would hang DDP's all-reduce."""
        finite = torch.isfinite(loss.detach()).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item() > 0)

    def _skip_step(self, batch_size: int) -> None:
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_total), batch_size=batch_size)
        reason = self.plan.cannot_skip_step(self.global_step)
        if reason is not None:
            raise NonFiniteLossError(reason)
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {self.nonfinite_in_row} steps in a row (step {self.global_step}); "
                "lower module.lr, enable gradient clipping (trainer.gradient_clip_val), check the data, or resume "
                "from an earlier checkpoint (raise module.max_nonfinite_in_row to tolerate more)"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient norm (before clipping, which Lightning applies after this hook), where the
        plan can read it here (else `optimizer_step` logs the engine's own)."""
        norm = self.plan.grad_norm(p for _, p in self.trained_parameters())
        if norm is not None:
            self.log("train/grad_norm", norm, batch_size=1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA (once per real optimizer step, before checkpoint callbacks run).

        An engine that accumulates micro-batches itself runs this hook for each of them: the plan
        says whether the optimizer really stepped, and gives the engine's gradient norm of that step.
        """
        with self.plan.optimizer_step() as step:
            super().optimizer_step(*args, **kwargs)
        if not step.stepped:
            return
        if step.grad_norm is not None:
            self.log("train/grad_norm", step.grad_norm, batch_size=1)
        if self.ema is not None:
            self.ema.update(self.trained_parameters(), gather=self.plan.whole_parameters)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Tell the data module this batch is being trained (its loader state is saved after it)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "mark_trained"):
            datamodule.mark_trained()

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over the trainable set's parameter groups (one per part), with the LR schedule."""
        self.plan.check_optimizer(self.optimizer_name, self.device.type)
        params = self.trainable.param_groups(self.model, self.lr, self.weight_decay)
        optimizer = build_optimizer(
            self.optimizer_name,
            params,
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            device_type=self.device.type,
            extra=self.optimizer_kwargs,
        )
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        factor = warmup_schedule(self.warmup_steps, self.lr_schedule, total, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- sampling ------------------------------------------------------------------------------
    @contextmanager
    def ema_applied(self, use_ema: bool = True) -> Iterator[SDXL]:
        """The SDXL model, with the EMA weights in place of the trained ones while the block runs (restored
        after) when there is an EMA and `use_ema`; for inference only (validation samples)."""
        if not use_ema or self.ema is None:
            yield self.model
            return
        with self.ema.applied_to(self):
            yield self.model

"""The LightningModule: trains the UNet of an SDXL model with the diffusion loss; the rest stays frozen.

Frozen VAE and text encoders: eval mode, no grads, not in the optimizer and, by default, not in
the training checkpoint (`state_dict` keeps the UNet and the EMA only). On resume the module is
built again from the model config (and its pretrained file), so the frozen parts come from there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from sgm.diffusion.denoiser import DiscreteDenoiser
from sgm.diffusion.loss import DiffusionLoss
from sgm.models.sdxl import SDXL
from sgm.training.ema import EMA
from sgm.training.lr import warmup_schedule
from sgm.training.optim import build_optimizer, check_optimizer_name
from sgm.training.strategies import (
    deepspeed_engine,
    scalar_parameters_to_buffers,
    zero_stage,
)

FROZEN_PARTS = ("model.conditioner.", "model.vae.")
BATCH_META_KEYS = ("__key__", "__url__")


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps in a row were skipped for a NaN/inf loss."""


def is_frozen_key(key: str) -> bool:
    """Whether a module state_dict key belongs to the frozen conditioner or VAE (any prefix)."""
    return any(key.startswith(part) or f".{part}" in key for part in FROZEN_PARTS)


def pixels_to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] in [0, 255] -> float32 in [-1, 1] (the VAE's input range)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"batch['jpg'] must be uint8 pixels from the loader, got {pixels.dtype}")
    return pixels.float().div_(127.5).sub_(1.0)


class SDXLTrainingModule(pl.LightningModule):
    """UNet training on an SDXL model: VAE encode, conditioner with CFG dropout, DiffusionLoss."""

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
    ) -> None:
        """`loss` is a partial of DiffusionLoss missing its denoiser (the module owns the denoiser,
        so its `sigmas` table moves with the module). `ema_decay=None` turns the EMA off.
        `offload_frozen` keeps the VAE and text encoders on the CPU once fit starts (they then only
        embed sample prompts and decode samples): for cached latents + text embeddings on a small GPU."""
        super().__init__()
        self.model = model
        self.model.freeze_frozen_parts()
        self.denoiser = denoiser
        self.loss_fn = loss(denoiser=denoiser)
        self.lr, self.betas, self.weight_decay, self.eps = lr, tuple(betas), weight_decay, eps
        check_optimizer_name(optimizer)  # a typo fails here, not at the first step
        self.optimizer_name, self.optimizer_kwargs = optimizer, dict(optimizer_kwargs or {})
        self.warmup_steps, self.lr_schedule, self.min_lr_ratio = warmup_steps, lr_schedule, min_lr_ratio
        warmup_schedule(warmup_steps, lr_schedule, 10**9 if lr_schedule == "cosine" else None)  # validate early
        if gradient_checkpointing is not None:
            self.model.unet.set_gradient_checkpointing(gradient_checkpointing)
        # The EMA is a plain attribute, not a submodule: DeepSpeed casts every submodule's parameters to
        # bf16 and partitions them under ZeRO-3. state_dict, load_state_dict and _apply carry it instead.
        self.__dict__["ema"] = EMA(self.model.unet, ema_decay) if ema_decay is not None else None
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

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """UNet (+ EMA, denoiser table) only, unless save_frozen_parts: the frozen parts are rebuilt."""
        full = super().state_dict(*args, **kwargs)
        if self.ema is not None:  # outside the module tree (see __init__), under its usual "ema." keys
            prefix = kwargs.get("prefix", "")
            full.update(self.ema.state_dict(prefix=f"{prefix}ema.", keep_vars=kwargs.get("keep_vars", False)))
        if self.save_frozen_parts:
            return full
        return OrderedDict((k, v) for k, v in full.items() if not is_frozen_key(k))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """A training checkpoint: frozen parts may be absent (this module has them from its config); the
        EMA is restored, started from the loaded weights when the checkpoint has none, or ignored when off."""
        state = dict(state_dict)
        ema_state = {k.removeprefix("ema."): state.pop(k) for k in list(state) if k.startswith("ema.")}
        result = super().load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not is_frozen_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"the checkpoint does not fit this model: {len(missing)} missing keys {missing[:3]}, "
                f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}; resume with the run's model config"
            )
        if self.ema is not None and ema_state:
            self.ema.load_state_dict(ema_state, strict=strict)
        elif self.ema is not None:  # EMA switched on mid-run: start it from the weights
            if any(hasattr(p, "ds_id") for p in self.model.unet.parameters()):
                self._ema_from_weights_at_start = True  # ZeRO-3: the weights arrive later, from the optimizer shards
            else:
                self.ema.copy_from(self.model.unet)
        return result._replace(missing_keys=missing)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> SDXLTrainingModule:
        """Moves and casts (.to, .cuda, .float) reach the EMA too, which is kept outside the module tree."""
        super()._apply(fn, recurse)
        if getattr(self, "ema", None) is not None:
            self.ema._apply(fn, recurse)
        return self

    def setup(self, stage: str) -> None:
        if zero_stage(self.trainer.strategy) is not None:  # DeepSpeed cannot broadcast 0-dim parameters
            scalar_parameters_to_buffers(self.model)

    def on_train_start(self) -> None:
        if self._ema_from_weights_at_start:
            self.ema.copy_from(self.model.unet)  # every rank: a gather under ZeRO-3
            self._ema_from_weights_at_start = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The skipped-step count; the weights are restored by load_state_dict (or by DeepSpeed)."""
        nonfinite = checkpoint.get("sgm_nonfinite_total")
        self.nonfinite_total = int(nonfinite or 0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sgm_nonfinite_total"] = self.nonfinite_total

    # -- training ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> SDXLTrainingModule:
        """Lightning calls train() on the whole module: keep the frozen parts in eval mode."""
        super().train(mode)
        self.model.conditioner.eval()
        self.model.vae.eval()
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
            for index in self.model.conditioner.text_embedder_indices():
                self.model.conditioner.embedders[index].to("cpu")

    def batch_latents(self, batch: Mapping[str, Any]) -> Tensor:
        """Cached latents when the loader gives them (LatentLoader: the VAE is skipped), else VAE-encoded pixels."""
        if self.offload_frozen and not ("latents" in batch and "cached_embeddings" in batch):
            raise ValueError(
                "module.offload_frozen=true keeps the VAE and text encoders on the CPU, so training needs cached "
                "latents and text embeddings (data=cached_latents, shards cached with --text-embeddings); "
                "set module.offload_frozen=false to train from images"
            )
        if "latents" in batch:
            return batch["latents"].float()
        if "jpg" not in batch:
            raise KeyError(f"a training batch needs 'jpg' (image shards) or 'latents' (cached shards); got {sorted(batch)}")
        return self.encode(batch["jpg"])

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
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
        if deepspeed_engine(self._trainer) is not None:
            raise NonFiniteLossError(
                f"the loss was NaN/inf at step {self.global_step}; DeepSpeed cannot skip an optimizer step, so the "
                "run stops: resume from the last checkpoint with a lower module.lr (or check the data), or train "
                "with strategy=ddp, which skips such steps"
            )
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {self.nonfinite_in_row} steps in a row (step {self.global_step}); "
                "lower module.lr, enable gradient clipping (trainer.gradient_clip_val), check the data, or resume "
                "from an earlier checkpoint (raise module.max_nonfinite_in_row to tolerate more)"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient norm (before clipping, which Lightning applies after this hook)."""
        if deepspeed_engine(self._trainer) is not None:
            return  # DeepSpeed keeps the gradients in its own (partitioned) buffers: logged after its step
        grads = [p.grad for p in self.model.unet.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm, batch_size=1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA (once per optimizer step, before checkpoint callbacks run).

        Under DeepSpeed this hook runs for every micro-batch (DeepSpeed accumulates gradients itself):
        only a call where the engine really stepped counts, and the engine gives the gradient norm
        (before clipping) it computed in that step.
        """
        engine = deepspeed_engine(self._trainer)
        steps_before = engine.global_steps if engine is not None else None
        super().optimizer_step(*args, **kwargs)
        if engine is not None:
            if engine.global_steps == steps_before:
                return
            norm = engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm), batch_size=1)
        if self.ema is not None:
            self.ema.update(self.model.unet)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Tell the data module this batch is being trained (its loader state is saved after it)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "mark_trained"):
            datamodule.mark_trained()

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.unet.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.optimizer_name, params, lr=self.lr, betas=self.betas, eps=self.eps,
                                    weight_decay=self.weight_decay, device_type=self.device.type,
                                    extra=self.optimizer_kwargs)  # fmt: skip
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        factor = warmup_schedule(self.warmup_steps, self.lr_schedule, total, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- sampling / export views ---------------------------------------------------------------
    def sampling_model(self, use_ema: bool = True) -> SDXL:
        """The SDXL model with the EMA UNet in place when there is one (shares every module)."""
        if use_ema and self.ema is not None:
            return SDXL(self.ema.shadow, self.model.conditioner, self.model.vae, self.model.scale_factor)
        return self.model

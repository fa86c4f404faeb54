"""`DeepSpeedPlan`: DeepSpeed ZeRO-2 / ZeRO-3 (with or without optimizer offload), as the training code sees it.

What differs from DDP: the engine keeps the gradients in its own (partitioned) buffers and accumulates
micro-batches itself, so the optimizer really steps only on some `optimizer_step` calls and the
gradient norm comes from the engine after its step; a step cannot be skipped; 0-dim parameters
cannot be broadcast; under ZeRO-3 the weights are partitioned (reading them is a chunked gather on
every rank, rank 0 cannot sample alone, and resumed weights arrive from the optimizer shards after
`load_state_dict`); checkpoints are directories of per-rank shards, resumed on another number of ranks
through their universal form (`reshard_for_resume`, sgm.parallel.reshard).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from sgm.parallel.plan import GATHER_NUMEL, NamedTensors, ParallelPlan, StepOutcome

DEFAULT_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's reduce_bucket_size and allgather_bucket_size defaults


class DeepSpeedPlan(ParallelPlan):
    """A DeepSpeed strategy, from its DeepSpeed config (`zero_optimization.stage`, `offload_optimizer`)."""

    name = "deepspeed"

    def __init__(self, config: Mapping[str, Any] | None = None, strategy: Any = None) -> None:
        super().__init__(strategy)
        self.config = dict(config or {})
        zero = dict(self.config.get("zero_optimization") or {})
        self.stage = int(zero.get("stage", 0))
        offload = dict(zero.get("offload_optimizer") or {})
        self.offloads_optimizer = str(offload.get("device", "none")).lower() in ("cpu", "nvme")
        reduce = int(zero.get("reduce_bucket_size", DEFAULT_BUCKET_ELEMENTS))
        self.bucket_elements = reduce + int(zero.get("allgather_bucket_size", DEFAULT_BUCKET_ELEMENTS))

    def __repr__(self) -> str:
        return f"DeepSpeedPlan(stage={self.stage}, offloads_optimizer={self.offloads_optimizer})"

    def engine(self) -> Any | None:
        """The DeepSpeed engine training the module (once the strategy set it up), else None."""
        model = getattr(self.strategy, "model", None)
        if model is None:
            return None
        import deepspeed

        return model if isinstance(model, deepspeed.DeepSpeedEngine) else None

    # -- training step -------------------------------------------------------------------------
    def cannot_skip_step(self, step: int) -> str | None:
        return (
            f"the loss was NaN/inf at step {step}; DeepSpeed cannot skip an optimizer step, so the "
            "run stops: resume from the last checkpoint with a lower module.lr (or check the data), or train "
            "with strategy=ddp, which skips such steps"
        )

    def grad_norm(self, params: Any) -> None:
        return None  # the gradients live in the engine's (partitioned) buffers: `optimizer_step` reports its norm

    @contextmanager
    def optimizer_step(self) -> Iterator[StepOutcome]:
        """The hook runs for every micro-batch (the engine accumulates itself): it stepped only when the
        engine's step count moved, and then the engine gives the gradient norm (before clipping) of that step."""
        engine = self.engine()
        before = engine.global_steps if engine is not None else None
        outcome = StepOutcome()
        yield outcome
        if engine is None:
            outcome.stepped = True
            return
        outcome.stepped = engine.global_steps != before
        norm = engine.get_global_grad_norm() if outcome.stepped else None
        outcome.grad_norm = float(norm) if norm is not None else None

    # -- model ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        scalar_parameters_to_buffers(model)  # DeepSpeed cannot broadcast 0-dim parameters

    def whole_parameters(self, named: NamedTensors, chunk_numel: int = GATHER_NUMEL) -> Iterator[NamedTensors]:
        """ZeRO-3 parameters are gathered chunk by chunk on every rank (a collective); others are whole already."""
        if not any(hasattr(param, "ds_id") for _, param in named):
            yield named
            return
        import deepspeed

        chunk: NamedTensors = []
        size = 0
        for name, param in named:
            chunk.append((name, param))
            size += int(getattr(param, "ds_numel", param.numel()))
            if size >= chunk_numel:
                with deepspeed.zero.GatheredParameters([p for _, p in chunk]):
                    yield chunk
                chunk, size = [], 0
        if chunk:
            with deepspeed.zero.GatheredParameters([p for _, p in chunk]):
                yield chunk

    @property
    def weights_restored_after_load(self) -> bool:
        return self.stage == 3

    @property
    def samples_on_rank_zero(self) -> bool:
        return self.stage != 3  # rank 0 holds only its partition of each weight: a forward alone would hang

    # -- checkpoints ---------------------------------------------------------------------------
    def reshard_for_resume(self, path: str | os.PathLike, world_size: int) -> os.PathLike | str:
        """`path` when it was saved by `world_size` ranks (or loads on any); else its universal form
        (`prepare_resharded`: converted once, safe on every rank), with the plan's strategy set up to load
        it (`use_universal_checkpoint`). Call before `trainer.fit`, on every rank."""
        from sgm.parallel.reshard import prepare_resharded, saved_world_size, use_universal_checkpoint

        saved = saved_world_size(path)
        if saved is None or saved == world_size:
            return path
        if self.strategy is None:
            raise ValueError(
                f"{path} needs resharding from {saved} to {world_size} ranks: make the plan from the trainer's strategy"
            )
        prepared = prepare_resharded(path, world_size)
        use_universal_checkpoint(self.strategy)
        return prepared

    def check_fits(self, path: str | os.PathLike) -> None:
        if Path(path).is_file():
            raise ValueError(
                f"{path} is a single-file checkpoint but the strategy is DeepSpeed, which resumes only from its own "
                "checkpoint directories: resume with the strategy that wrote it (strategy=ddp ...), or export it and "
                "start a new run from the file (pretrained=out.safetensors name=...)"
            )


def scalar_parameters_to_buffers(module: nn.Module) -> list[str]:
    """Turn frozen 0-dim parameters (OpenCLIP's `logit_scale`) into buffers of the same name; returns their names.

    DeepSpeed broadcasts every parameter as bytes at start-up (`p.data.view(torch.uint8)`), which
    fails on a 0-dim tensor. A buffer keeps the name, value and state_dict entry and is not broadcast.
    """
    moved = []
    for prefix, sub in module.named_modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.dim() == 0 and not param.requires_grad:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach())
                moved.append(f"{prefix}.{name}" if prefix else name)
    return moved

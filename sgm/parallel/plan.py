"""`ParallelPlan`: what the training code asks about its strategy; this base class answers for DDP and one device.

Under DDP (and a single process) every rank holds whole weights and plain `.grad`s, the optimizer
steps once per `optimizer_step` call, a non-finite step can be skipped, and a checkpoint is one file.
Other engines subclass it (`sgm.parallel.zero.DeepSpeedPlan`) and override what differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgm.parallel.checkpoints import is_sharded_checkpoint
from sgm.parallel.optimizers import STRATEGY_OPTIMIZERS

# Sharded parameters are gathered this many elements at a time for reading (bounds the transient
# memory: 2^27 elements = 256 MB in bf16).
GATHER_NUMEL = 1 << 27
NamedTensors = list[tuple[str, Tensor]]
Gather = Callable[[NamedTensors], Iterator[NamedTensors]]


@dataclass
class StepOutcome:
    """What one `optimizer_step` call did: filled in when its `ParallelPlan.optimizer_step` block ends."""

    stepped: bool = False
    grad_norm: float | None = None  # the engine's own norm (before clipping), when it keeps the gradients


class ParallelPlan:
    """DDP / single device: whole weights on every rank, gradients in `.grad`, one-file checkpoints."""

    name = "ddp"
    offloads_optimizer = False  # optimizer state and master weights in host memory
    bucket_elements = 0  # elements of the communication buckets a memory estimate should count (none here)

    def __init__(self, strategy: Any = None) -> None:
        self.strategy = strategy  # the Lightning strategy, when the plan was made from one

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- training step -------------------------------------------------------------------------
    def cannot_skip_step(self, step: int) -> str | None:
        """None when a step with a non-finite loss can be skipped; else why the run must stop, with the fix."""
        return None

    def grad_norm(self, params: Iterable[Tensor]) -> Tensor | None:
        """The total gradient norm before clipping, from `.grad` (call before the optimizer step); None when
        the engine keeps the gradients itself (then `optimizer_step` reports its norm)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    @contextmanager
    def optimizer_step(self) -> Iterator[StepOutcome]:
        """Wrap one `optimizer_step` call; the outcome says whether the optimizer really stepped."""
        outcome = StepOutcome()
        yield outcome
        outcome.stepped = True

    # -- model ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Adapt the plain model before the strategy wraps it (in the LightningModule's `setup`)."""

    def whole_parameters(self, named: NamedTensors, chunk_numel: int = GATHER_NUMEL) -> Iterator[NamedTensors]:
        """Yield the parameters in chunks, each whole (readable) while it is handled. A collective where
        weights are sharded: call it on every rank. Here they are whole: one chunk."""
        yield named

    @property
    def weights_restored_after_load(self) -> bool:
        """Whether the strategy restores the weights after `load_state_dict` (ZeRO-3: from the optimizer shards)."""
        return False

    @property
    def samples_on_rank_zero(self) -> bool:
        """Whether rank 0 alone may run the model (validation samples) while the other ranks wait."""
        return True

    # -- optimizer and checkpoints -------------------------------------------------------------
    def check_optimizer(self, name: str, device_type: str) -> None:
        """Fail, naming the fix, when optimizer `name` cannot step this strategy's parameters on `device_type`."""
        spec = STRATEGY_OPTIMIZERS.get(name)
        if spec is None or not spec.steps_in_host_memory or self.offloads_optimizer or device_type == "cpu":
            return
        raise ValueError(
            f"module.optimizer={name} steps parameters in host memory, but strategy {self.name} keeps them on "
            f"{device_type}: it needs {spec.needs}; or choose module.optimizer=adamw / adafactor / adamw8bit"
        )

    def reshard_for_resume(self, path: str | os.PathLike, world_size: int) -> os.PathLike | str:
        """What to pass to `trainer.fit(ckpt_path=...)` to resume `path` on `world_size` processes (set the
        strategy up for it where needed). A `.ckpt` file loads on any world size: `path` itself."""
        return path

    def check_fits(self, path: str | os.PathLike) -> None:
        """Fail early, naming the fix, when the checkpoint at `path` cannot be resumed under this strategy."""
        if is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is a DeepSpeed checkpoint directory but the strategy is not DeepSpeed: resume with the strategy "
                "that wrote it (strategy=deepspeed_zero2 / deepspeed_zero3 ...), or export it (python -m sgm.training.export "
                "DIR out.safetensors) and start a new run from that file (pretrained=out.safetensors name=...)"
            )

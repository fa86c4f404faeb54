"""DeepSpeed helpers: a CPU variant of Lightning's DeepSpeedStrategy for tests and CI, and strategy queries.

Production configs (configs/strategy/deepspeed_*.yaml) use Lightning's stock `DeepSpeedStrategy` on
GPUs. Stock DeepSpeed refuses to run on CPU, yet CI must prove the sharded paths (ZeRO-2/3 saves,
consolidation, resume) with two real processes. `CPUDeepSpeedStrategy` is that test path: select it
on top of a production config, so the YAML's DeepSpeed settings are what gets tested:

    python train.py strategy=deepspeed_zero2 trainer.strategy._target_=sgm.training.strategies.CPUDeepSpeedStrategy \
        trainer.accelerator=cpu trainer.devices=2

Nobody trains on CPU with DeepSpeed: it is slower than DDP there and exists only to run the code paths.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn
from torch.optim import Optimizer


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with the three CUDA-only assumptions removed (gloo on CPU).

    1. `setup_environment`: skip the "only supported on CUDA GPUs" accelerator check;
    2. `setup_distributed`: skip the device-index check (CPU devices have index None);
    3. `_setup_model_and_optimizer`: give `deepspeed.initialize` the local rank as device rank
       (Lightning passes the device index, None on CPU, which DeepSpeed cannot use).
    """

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Optimizer | None, lr_scheduler: Any = None) -> Any:
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


def deepspeed_engine(trainer: pl.Trainer | None) -> Any | None:
    """The DeepSpeed engine training this trainer's module, or None under any other strategy."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    import deepspeed

    model = strategy.model
    return model if isinstance(model, deepspeed.DeepSpeedEngine) else None


def zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy (0 when ZeRO is off), None for other strategies."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    zero = (strategy.config or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0))


def is_deepspeed_config(strategy: Any) -> bool:
    """Whether a `trainer.strategy` config value (a registry name, or a `_target_` mapping) selects DeepSpeed."""
    if isinstance(strategy, Mapping):
        return "deepspeed" in str(strategy.get("_target_", "")).rsplit(".", 1)[-1].lower()
    return isinstance(strategy, str) and strategy.startswith("deepspeed")


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

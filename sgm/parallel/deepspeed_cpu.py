"""`CPUDeepSpeedStrategy`: Lightning's DeepSpeedStrategy on CPU (gloo), so CI proves the sharded paths.

Production configs (configs/strategy/deepspeed_*.yaml) use Lightning's stock `DeepSpeedStrategy` on
GPUs. Stock DeepSpeed refuses to run on CPU, yet CI must prove the sharded paths (ZeRO-2/3 saves,
consolidation, resume) with two real processes. This is that test path: select it on top of a
production config, so the YAML's DeepSpeed settings are what gets tested:

    python train.py strategy=deepspeed_zero2 trainer.strategy._target_=sgm.parallel.deepspeed_cpu.CPUDeepSpeedStrategy \
        trainer.accelerator=cpu trainer.devices=2

Nobody trains on CPU with DeepSpeed: it is slower than DDP there and exists only to run the code paths.
"""

from __future__ import annotations

import argparse
from typing import Any

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

    def _setup_model_and_optimizer(
        self, model: nn.Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> Any:
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

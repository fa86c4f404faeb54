"""Optimizers that only apply under some strategies (today DeepSpeed's CPU Adam, for ZeRO optimizer offload).

`sgm.training.optim` builds every optimizer by name; for these it takes the class and defaults from
here, and the module asks its plan (`ParallelPlan.check_optimizer`) whether the run's strategy allows them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer


def _deepspeed_cpu_adam() -> type[Optimizer]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # built on first use (C++ extension, about a minute)

    return DeepSpeedCPUAdam


@dataclass(frozen=True)
class StrategyOptimizer:
    """One strategy-bound optimizer: how to build it and what it needs."""

    load: Callable[[], type[Optimizer]]  # the class, imported on first use
    defaults: Mapping[str, Any] = field(default_factory=dict)  # constructor defaults the module's settings lack
    state_bytes_per_value: int = 8  # optimizer state per parameter value (what the memory estimate counts)
    steps_in_host_memory: bool = True  # only for parameters in host memory: CPU runs, or optimizer offload
    needs: str = ""  # the fix, for the error when the strategy does not allow it


STRATEGY_OPTIMIZERS: dict[str, StrategyOptimizer] = {
    # fp32 moments of the fp32 master copy (8 bytes per value); its step counter is a Python int
    "deepspeed_cpu_adam": StrategyOptimizer(
        load=_deepspeed_cpu_adam,
        defaults={"adamw_mode": True},
        needs="ZeRO optimizer offload (strategy=deepspeed_zero2_offload)",
    ),
}

"""`plan_for`: the `ParallelPlan` of a Lightning strategy object or of a `trainer.strategy` config value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sgm.parallel.plan import ParallelPlan
from sgm.parallel.zero import DeepSpeedPlan

# Lightning's registry names for DeepSpeed -> the DeepSpeed config they stand for
_DEEPSPEED_NAMES = {
    "deepspeed": {},
    "deepspeed_stage_1": {"zero_optimization": {"stage": 1}},
    "deepspeed_stage_2": {"zero_optimization": {"stage": 2}},
    "deepspeed_stage_2_offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    "deepspeed_stage_3": {"zero_optimization": {"stage": 3}},
    "deepspeed_stage_3_offload": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
    "deepspeed_stage_3_offload_nvme": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
}


def plan_for(strategy: Any) -> ParallelPlan:
    """The plan of `strategy`: a Lightning strategy object (what `trainer.strategy` is), a `trainer.strategy`
    config value (a registry name such as "ddp" or "deepspeed_stage_3", or a `_target_` mapping with its
    DeepSpeed `config`), a plan (returned as is), or None / "auto" (one device or DDP)."""
    if isinstance(strategy, ParallelPlan):
        return strategy
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
        _refuse_unsupported(target)
        if "deepspeed" in target.lower():
            return DeepSpeedPlan(_plain(strategy.get("config")) or _from_arguments(strategy))
        return ParallelPlan()
    if isinstance(strategy, str):
        _refuse_unsupported(strategy)
        if strategy.startswith("deepspeed"):
            return DeepSpeedPlan(_DEEPSPEED_NAMES.get(strategy, {}))
        return ParallelPlan()
    if strategy is None:
        return ParallelPlan()
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return DeepSpeedPlan(strategy.config, strategy=strategy)
    _refuse_unsupported(type(strategy).__name__)
    return ParallelPlan(strategy=strategy)


def check_fits_strategy(path: str | os.PathLike, strategy: Any) -> None:
    """Fail early, naming the fix, when the checkpoint at `path` cannot be resumed under `strategy` (as `plan_for`)."""
    plan_for(strategy).check_fits(path)


def _refuse_unsupported(name: str) -> None:
    lowered = name.lower()
    if "fsdp" in lowered or "modelparallel" in lowered:
        raise ValueError(
            f"trainer.strategy {name!r}: sharded data parallel (FSDP) has no plan in sgm.parallel yet; "
            "use strategy=ddp or strategy=deepspeed_zero2 / deepspeed_zero3"
        )


def _from_arguments(strategy: Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config Lightning's DeepSpeedStrategy builds from its arguments when given no `config`."""
    offload = {"offload_optimizer": {"device": "cpu"}} if strategy.get("offload_optimizer") else {}
    return {"zero_optimization": {"stage": int(strategy.get("stage", 2)), **offload}}


def _plain(config: Any) -> dict[str, Any]:
    """A DeepSpeed config as plain dicts (it may arrive as an OmegaConf node)."""
    if config is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return dict(config) if isinstance(config, Mapping) else {}

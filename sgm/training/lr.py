"""Learning-rate schedules: linear warmup, then constant or cosine decay (factors for LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "cosine")


def warmup_schedule(
    warmup_steps: int,
    schedule: str = "constant",
    total_steps: int | None = None,
    min_ratio: float = 0.0,
) -> Callable[[int], float]:
    """Factor of the base LR at optimizer step `step` (0-based), for torch's LambdaLR.

    Warmup ramps (step + 1) / warmup_steps up to 1 (the official LambdaLinearScheduler's shape);
    cosine then decays from 1 to `min_ratio` at `total_steps` and stays there.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {SCHEDULES} (module.lr_schedule.schedule)")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule == "cosine" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(
            f"the cosine schedule needs total_steps > warmup_steps (got {total_steps} and {warmup_steps}); "
            "set trainer.max_steps"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))  # type: ignore[operator]
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

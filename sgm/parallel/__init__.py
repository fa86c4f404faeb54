"""The parallelism seam: the one place that knows what differs between DDP and DeepSpeed ZeRO-2/3/offload.

Everything else asks it. `plan_for(strategy)` turns a Lightning strategy (or a `trainer.strategy`
config value) into a `ParallelPlan` that answers the training module's and the EMA's questions
(can a non-finite step be skipped, the gradient norm, did the optimizer really step, how to read
sharded weights, may samples run on rank 0 alone, which optimizers apply, which checkpoints fit).
The checkpoint side knows both on-disk forms of a training checkpoint, a `.ckpt` file and a sharded
`.ckpt` directory: detection, the crash-safe save bracket, `newest_checkpoint`, and
`read_training_checkpoint`, which reads either as one Lightning checkpoint dict. `sgm.parallel.reshard`
resumes a sharded directory on another number of processes (`plan.reshard_for_resume`).

A new engine (FSDP2) is one more plan class here plus its branch in `plan_for`.
"""

from sgm.parallel.checkpoints import (
    COMPLETE_MARKER,
    begin_save,
    end_save,
    is_sharded_checkpoint,
    newest_checkpoint,
    save_training_checkpoint,
)
from sgm.parallel.consolidate import (
    DEEPSPEED_KEYS,
    consolidate_deepspeed_checkpoint,
    read_checkpoint_entries,
    read_training_checkpoint,
)
from sgm.parallel.optimizers import STRATEGY_OPTIMIZERS, StrategyOptimizer
from sgm.parallel.plan import GATHER_NUMEL, ParallelPlan, StepOutcome
from sgm.parallel.reshard import (
    is_universal_checkpoint,
    load_module_extras,
    prepare_resharded,
    saved_world_size,
    universal_path,
    use_universal_checkpoint,
)
from sgm.parallel.select import check_fits_strategy, plan_for
from sgm.parallel.zero import DeepSpeedPlan, scalar_parameters_to_buffers

__all__ = [
    "COMPLETE_MARKER",
    "DEEPSPEED_KEYS",
    "GATHER_NUMEL",
    "STRATEGY_OPTIMIZERS",
    "DeepSpeedPlan",
    "ParallelPlan",
    "StepOutcome",
    "StrategyOptimizer",
    "begin_save",
    "check_fits_strategy",
    "consolidate_deepspeed_checkpoint",
    "end_save",
    "is_sharded_checkpoint",
    "is_universal_checkpoint",
    "load_module_extras",
    "newest_checkpoint",
    "plan_for",
    "read_checkpoint_entries",
    "prepare_resharded",
    "read_training_checkpoint",
    "save_training_checkpoint",
    "saved_world_size",
    "scalar_parameters_to_buffers",
    "universal_path",
    "use_universal_checkpoint",
]

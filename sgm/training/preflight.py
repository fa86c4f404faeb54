"""Checks a composed train config, its data and what it would resume BEFORE the run writes anything.

A run that fails here leaves its run directory (and an existing run in it) untouched: each problem is
one `ConfigError` naming the key and the fix, which the entry point prints as one message (exit 2).

The demo rule: `experiment=demo` (train.yaml's default) is the README's demo job. With it active, a
choice of your own model, data, stage or pretrained file is an error naming `~experiment` as the fix,
so a real run never trains silently with the demo's 300 steps, 2 threads and emoji data. Without the
demo, `name` has no default: each run names its own folder (outputs/runs/<name>).

The resume rule: continuing a checkpoint with settings other than the ones its run recorded
(<run_dir>/config.yaml) is an error listing the differences; `name=<new>` starts fresh and
`resume_allow_changes=true` continues anyway. RESUMABLE_CHANGES may differ without asking.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RUN_CONFIG = "config.yaml"  # as sgm.checkpoint.model_source.RUN_CONFIG: the resolved config a run records
DEMO = "demo"
# Group choices and keys that make a run the user's own: with the demo experiment on, they are an error.
OWN_RUN_KEYS = ("model", "data", "stage", "pretrained", "pretrained_parts")
# Keys a resumed run may change without resume_allow_changes (a key and everything under it): how long,
# on how many devices, how it logs, samples, checkpoints and exports; not what it trains or on what.
RESUMABLE_CHANGES = (
    "name",
    "run_dir",
    "resume",
    "resume_allow_changes",
    "resume_reshard",
    "trainer.max_steps",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "logger",
    "threads",
    "samples",
    "checkpoint",
    "export",
    "demo_data",
    "log_batch_keys",
    "progress",
    "data.num_workers",
    "module.compile",
    "validation",  # the holdout split itself is recorded and kept (sgm/training/validation_split.py)
    "eval_metrics",
)
MISSING_FIXES = {
    "name": "name=<run> (the run's folder: outputs/runs/<run>; only the demo experiment sets one)",
    "data.shards": "data.shards='<folder>/*.tar'",
    "pretrained": "pretrained=/path/to/model.safetensors",
    "data.folder": "data.folder=/path/to/images (jpg/png/webp with same-name .txt captions; sub-folders included)",
}

_ABSENT = object()


class ConfigError(ValueError):
    """A setting (or the data, or the run dir) that cannot work: the key, what is wrong, and the fix."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key, self.problem, self.fix = key, problem, fix
        separator = "" if problem.endswith("\n") else ". "  # a listing (the resume check) ends in a newline
        super().__init__(f"{key}: {problem}{separator}Fix: {fix}" if fix else f"{key}: {problem}")


# -- the composed config -----------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


# key, test, what it must be, an example fix; a key the config does not have is not checked
RANGES: tuple[tuple[str, Callable[[Any], bool], str, str], ...] = (
    ("seed", _is_int, "an integer", "seed=0"),
    ("threads", lambda v: v is None or _int_at_least(1)(v), "null or an integer >= 1", "threads=4"),
    ("data.batch_size", _int_at_least(1), "an integer >= 1", "data.batch_size=4"),
    ("data.num_workers", _int_at_least(0), "an integer >= 0", "data.num_workers=2"),
    ("data.shuffle_buffer", _int_at_least(0), "an integer >= 0", "data.shuffle_buffer=1000"),
    ("trainer.max_steps", _int_at_least(1), "an integer >= 1", "trainer.max_steps=1000"),
    ("trainer.accumulate_grad_batches", _int_at_least(1), "an integer >= 1", "trainer.accumulate_grad_batches=1"),
    (
        "trainer.gradient_clip_val",
        lambda v: v is None or (_is_number(v) and v >= 0),
        "null or a number >= 0",
        "trainer.gradient_clip_val=1.0",
    ),
    ("module.lr", lambda v: _is_number(v) and v > 0, "a number > 0", "module.lr=1e-4"),
    ("module.warmup_steps", _int_at_least(0), "an integer >= 0", "module.warmup_steps=0"),
    ("module.min_lr_ratio", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]", "module.min_lr_ratio=0.0"),
    (
        "module.ema_decay",
        lambda v: v is None or (_is_number(v) and 0 < v < 1),
        "null (no EMA) or a number in (0, 1)",
        "module.ema_decay=0.9999",
    ),
    ("checkpoint.every_n_train_steps", _int_at_least(1), "an integer >= 1", "checkpoint.every_n_train_steps=500"),
    ("samples.every_n_steps", _int_at_least(0), "an integer >= 0 (0: only at the end)", "samples.every_n_steps=0"),
    ("samples.num_steps", _int_at_least(1), "an integer >= 1", "samples.num_steps=20"),
    ("samples.height", lambda v: _is_int(v) and v >= 8 and v % 8 == 0, "a multiple of 8", "samples.height=128"),
    ("samples.width", lambda v: _is_int(v) and v >= 8 and v % 8 == 0, "a multiple of 8", "samples.width=128"),
    (
        "progress.every_n_steps",
        lambda v: v == "auto" or _int_at_least(0)(v),
        "auto or an integer >= 0 (0: off)",
        "progress.every_n_steps=auto",
    ),
)


def _choices() -> dict[str, tuple[str, ...]]:
    from sgm.checkpoint.official_layout import PARTS
    from sgm.data.crop import CROP_MODES
    from sgm.training.lr import SCHEDULES
    from sgm.training.optim import OPTIMIZERS

    return {
        "module.optimizer": OPTIMIZERS,
        "module.lr_schedule": SCHEDULES,
        "data.crop": CROP_MODES,
        "export.dtype": ("fp32", "fp16", "bf16"),
        "pretrained_parts": PARTS,
    }


def check_config(
    cfg: DictConfig, overrides: Iterable[str] | None = None, choices: dict[str, Any] | None = None
) -> None:
    """Raise ConfigError for the first problem of the composed config. `overrides` (the command line's) and
    `choices` (group -> option) come from Hydra; without them (a config composed in code) the demo rule is
    not checked."""
    missing = _missing_keys(cfg)
    if missing:
        also = f" (nor are {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(missing[0], f"not set{also}", MISSING_FIXES.get(missing[0], f"{missing[0]}=<value>"))
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        raise ConfigError(
            str(key), f"cannot be resolved ({str(error).splitlines()[0]})", "correct the reference"
        ) from None
    for key, test, need, fix in RANGES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not test(value):
            raise ConfigError(key, f"must be {need}, got {value!r}", fix)
    for key, allowed in _choices().items():
        value = OmegaConf.select(cfg, key, default=None)
        values = [value] if isinstance(value, str) else list(value or [])
        for item in values:
            if item not in allowed:
                raise ConfigError(key, f"unknown choice {item!r}", f"one of {', '.join(allowed)}")
    resume = cfg.get("resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError("resume", f"must be auto, null or a checkpoint path, got {resume!r}", "resume=auto")
    if resume not in (None, "auto", "null", "none") and not Path(resume).exists():
        raise ConfigError("resume", f"no checkpoint at {resume}", "resume=auto (the run's newest) or a .ckpt path")
    if cfg.get("pretrained") and not Path(cfg.pretrained).is_file():
        raise ConfigError(
            "pretrained",
            f"no such file: {cfg.pretrained}",
            "an official-layout .safetensors file (a released SDXL file, or a run's <name>_full.safetensors)",
        )
    if overrides is not None and choices is not None:
        check_demo_rule(cfg, list(overrides), choices)


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys set to ??? (interpolations that lead to one are reported at their target)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    found = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            found.append(path)
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(child := node[key]):
            found += _missing_keys(child, path)
    return found


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+").split("@", 1)[0]


def check_demo_rule(cfg: DictConfig, overrides: list[str], choices: dict[str, Any]) -> None:
    """With experiment=demo active: refuse a model, data, stage or pretrained choice of the user's own, and
    data outside the demo's own folder (the demo's settings would silently apply to them)."""
    if choices.get("experiment") != DEMO:
        return
    fix = "add ~experiment (or experiment=<preset>) and name=<run> for your own run"
    own = [o for o in overrides if _override_key(o) in OWN_RUN_KEYS]
    if own:
        raise ConfigError(
            "experiment",
            f"the demo experiment (the default) is on, and its settings (300 steps, "
            f"emoji data, 2 threads) would apply to your {' '.join(own)}",
            fix,
        )
    demo_data, shards = cfg.get("demo_data"), OmegaConf.select(cfg, "data.shards", default=None)
    if demo_data and isinstance(shards, str) and not _inside(shards, str(demo_data.out)):
        raise ConfigError(
            "experiment",
            f"the demo experiment (the default) is on with data.shards={shards}, outside "
            f"its data folder demo_data.out={demo_data.out}",
            fix,
        )


def _inside(pattern: str, folder: str) -> bool:
    return os.path.abspath(pattern).startswith(os.path.abspath(folder).rstrip(os.sep) + os.sep)


def hydra_context() -> tuple[list[str] | None, dict[str, Any] | None]:
    """(command-line overrides, group choices) of the running Hydra job, or (None, None) outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    return list(hydra.overrides.task), dict(hydra.runtime.choices)


# -- the data ----------------------------------------------------------------------------------------------
def check_data(cfg: DictConfig) -> None:
    """Build rank 0's loader once (shards expanded, buckets and batch settings validated), reading nothing."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        instantiate(cfg.data)(rank=0, world_size=1)
    except (ValueError, TypeError, FileNotFoundError, InstantiationException) as error:
        if "shard" in str(error):
            raise ConfigError(
                "data.shards",
                str(error).rstrip("."),
                "point data.shards at your shards, e.g. "
                "data.shards='/data/shards/*.tar' (brace patterns and pipe:/URLs work too)",
            ) from None
        raise ConfigError("data", str(error).rstrip("."), "correct the data setting named there") from None


# -- what the run would resume ----------------------------------------------------------------------------
def check_resume(cfg: DictConfig, checkpoint: str | None) -> None:
    """Refuse to continue `checkpoint` when its run recorded other settings (see RESUMABLE_CHANGES)."""
    if checkpoint is None or cfg.get("resume_allow_changes"):
        return
    recorded = Path(checkpoint).absolute().parent.parent / RUN_CONFIG
    if not recorded.is_file():
        return
    old = _flatten(OmegaConf.to_container(OmegaConf.load(recorded), resolve=False))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    # keys only the new config has are options added since the run started: not compared
    changed = [
        f"  {key}: {old[key]!r} -> {new[key]!r}" if key in new else f"  {key}: {old[key]!r} -> (removed)"
        for key in sorted(old)
        if old[key] != new.get(key, _ABSENT) and not _resumable(key)
    ]
    if changed:
        shown = changed[:12] + ([f"  ... and {len(changed) - 12} more"] if len(changed) > 12 else [])
        raise ConfigError(
            "resume",
            f"{checkpoint} was trained with other settings (its {recorded}):\n" + "\n".join(shown) + "\n",
            "name=<new run> starts a fresh run, or resume_allow_changes=true continues this one with the new settings",
        )


def check_resume_layout(cfg: DictConfig, checkpoint: str | None) -> None:
    """Refuse (unless resume_reshard) to continue a checkpoint whose data position was saved by another number
    of processes or loader workers than this run would have (where the config says how many: trainer.devices
    as a count or list, trainer.num_nodes); other cases are caught when the position is restored."""
    if checkpoint is None or cfg.get("resume_reshard"):
        return
    from sgm.parallel import read_checkpoint_entries

    fingerprint = (read_checkpoint_entries(checkpoint).get("SDXLDataModule") or {}).get("loader", {}).get("fingerprint")
    processes = planned_processes(cfg)
    if not fingerprint or processes is None:
        return
    saved = (fingerprint.get("world_size"), fingerprint.get("num_workers"))
    planned = (processes, int(cfg.data.get("num_workers") or 0))
    if saved != planned:
        from sgm.data.loader import layout_change

        raise ConfigError("resume_reshard", f"{checkpoint}: {layout_change(saved, planned)}")


def planned_processes(cfg: DictConfig) -> int | None:
    """trainer.devices x trainer.num_nodes where the config gives a count (an int or a device list); else None."""
    devices, nodes = cfg.trainer.get("devices", "auto"), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif devices == "auto" and cfg.trainer.get("accelerator") == "cpu":
        devices = 1
    if not _is_int(devices) or devices < 1 or not _is_int(nodes):
        return None
    return devices * nodes


def _resumable(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in RESUMABLE_CHANGES)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


# -- the entry point's errors ---------------------------------------------------------------------------------
def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user's settings or files cause, each with a message naming the fix: printed without a traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from sgm.checkpoint.io import CheckpointMismatchError
    from sgm.checkpoint.lineage import LineageError
    from sgm.checkpoint.model_source import ModelSourceError
    from sgm.checkpoint.training_ckpt import TrainingCheckpointError
    from sgm.data.loader import TooManyBadSamples
    from sgm.training.module import NonFiniteLossError

    return (
        ConfigError,
        CheckpointMismatchError,
        LineageError,
        ModelSourceError,
        TrainingCheckpointError,
        NonFiniteLossError,
        TooManyBadSamples,
        MisconfigurationException,
        FileNotFoundError,
    )

"""The validation settings of a run and its held-out shards: which shards validation reads, which training reads.

`validation.shards` names a held-out set outright. `validation.holdout_fraction` keeps whole shards of
`data.shards` out of training instead: the shards sorted by a hash of their file name, the first
ceil(fraction x n) of them (at least one, and at least one left to train on). The hash takes the name
only, not the seed or the folder: every run over the same shards holds out the same ones (their
validation losses compare), and a latent cache keeps its images' shard names, so it holds out the
same samples. The split is recorded in `<run_dir>/validation_split.json`; a resume reuses the split
recorded by the checkpoint's run and refuses a setting that would change it (resume_allow_changes=true
makes a new one). Training then reads only the remaining shards: `validation_plan` returns the data
config for that, the one place the split reaches the loaders.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sgm.checkpoint.io import atomic_write
from sgm.data.shard_list import expand_shards, shard_name
from sgm.training.preflight import ConfigError

SPLIT_FILE = "validation_split.json"
KEY = "validation"


@dataclass(frozen=True)
class ValidationSettings:
    """The `validation:` block of a train config (configs/train.yaml documents each key)."""

    shards: Any = None
    holdout_fraction: float = 0.0
    every_n_steps: int = 0
    timestep_buckets: int = 8
    max_samples: int = 256
    batch_size: int | None = None
    ema: bool = True
    at_start: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.shards) or self.holdout_fraction > 0


@dataclass
class ValidationPlan:
    """What a run validates on (`shards`, empty when off), the data config training reads, and the split to
    record (None without a holdout)."""

    settings: ValidationSettings
    shards: list[str] = field(default_factory=list)
    train_data: DictConfig | None = None
    split: dict[str, Any] | None = None


def read_settings(cfg: DictConfig) -> ValidationSettings:
    """The checked `validation` block (absent: validation off); ConfigError naming the key that is wrong."""
    block = cfg.get(KEY)
    values = OmegaConf.to_container(block, resolve=True) if block is not None else {}
    known = set(ValidationSettings.__dataclass_fields__)
    unknown = sorted(set(values) - known)  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"{KEY}.{unknown[0]}", "unknown setting", f"one of {', '.join(sorted(known))}")
    settings = ValidationSettings(**values)  # type: ignore[arg-type]
    checks = (
        (
            "holdout_fraction",
            _number(settings.holdout_fraction) and 0 <= settings.holdout_fraction < 1,
            "a number in [0, 1)",
            "0.1",
        ),
        ("every_n_steps", _integer(settings.every_n_steps, 0), "an integer >= 0 (0: only at the end)", "500"),
        ("timestep_buckets", _integer(settings.timestep_buckets, 1), "an integer >= 1", "8"),
        ("max_samples", _integer(settings.max_samples, 1), "an integer >= 1", "256"),
        (
            "batch_size",
            settings.batch_size is None or _integer(settings.batch_size, 1),
            "null or an integer >= 1",
            "null",
        ),
        ("ema", isinstance(settings.ema, bool), "true or false", "true"),
        ("at_start", isinstance(settings.at_start, bool), "true or false", "false"),
    )
    for name, ok, need, example in checks:
        if not ok:
            raise ConfigError(
                f"{KEY}.{name}", f"must be {need}, got {getattr(settings, name)!r}", f"{KEY}.{name}={example}"
            )
    if settings.shards and settings.holdout_fraction > 0:
        raise ConfigError(
            f"{KEY}.holdout_fraction",
            "is set together with validation.shards; the held-out set is one or the other",
            "validation.holdout_fraction=0 (validate on validation.shards) or validation.shards=null",
        )
    return settings


def holdout_split(shards: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(held out, training): whole shards, by a hash of each shard's file name; both keep the list's order."""
    ranked = sorted(
        range(len(shards)), key=lambda i: (hashlib.sha256(shard_name(shards[i]).encode()).hexdigest(), shards[i])
    )
    count = min(max(1, math.ceil(fraction * len(shards))), len(shards) - 1)
    held = set(ranked[:count])
    return [s for i, s in enumerate(shards) if i in held], [s for i, s in enumerate(shards) if i not in held]


def read_split(run_dir: Path | None) -> dict[str, Any] | None:
    """The split a run recorded (validation_split.json), or None."""
    path = Path(run_dir) / SPLIT_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def write_split(run_dir: Path, split: dict[str, Any]) -> Path:
    """Record the split in `<run_dir>/validation_split.json` (atomically)."""
    text = json.dumps(split, indent=1) + "\n"
    return atomic_write(Path(run_dir) / SPLIT_FILE, lambda tmp: tmp.write_text(text))


def validation_plan(cfg: DictConfig, checkpoint: str | None = None) -> ValidationPlan:
    """The held-out shards and the data config training reads (without the held-out shards), checked before
    the run writes anything. A resume of `checkpoint` reuses the split its run recorded."""
    settings = read_settings(cfg)
    plan = ValidationPlan(settings)
    if not settings.enabled:
        return plan
    if settings.shards:
        try:
            plan.shards = expand_shards(_as_list(settings.shards))
        except ValueError as error:
            raise ConfigError(
                f"{KEY}.shards", str(error).rstrip("."), "point validation.shards at held-out .tar shards"
            ) from None
        return plan
    shards = _data_shards(cfg, settings.holdout_fraction)
    split = _resumed_split(cfg, checkpoint, shards, settings.holdout_fraction)
    if split is None:
        held, training = holdout_split(shards, settings.holdout_fraction)
        split = {
            "holdout_fraction": settings.holdout_fraction,
            "data_shards": shards,
            "held_out": held,
            "training": training,
        }
    plan.shards, plan.split = list(split["held_out"]), split
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    data.shards = list(split["training"])
    plan.train_data = data
    return plan


def _data_shards(cfg: DictConfig, fraction: float) -> list[str]:
    """data.shards expanded, or a ConfigError when they cannot be split (no shard list, or one shard)."""
    key = f"{KEY}.holdout_fraction"
    given = OmegaConf.select(cfg, "data.shards", default=None)
    if not given:
        raise ConfigError(
            key,
            f"is {fraction}, but this data config has no shard list to split (data={_data_kind(cfg)} builds its shards itself)",
            "give validation.shards=<held-out .tar shards> and validation.holdout_fraction=0",
        )
    try:
        shards = expand_shards(_as_list(given))
    except ValueError as error:
        raise ConfigError("data.shards", str(error).rstrip("."), "point data.shards at your shards") from None
    if len(shards) < 2:
        raise ConfigError(
            key,
            f"is {fraction}, but data.shards has {len(shards)} shard: whole shards are held out and one must be left to train on",
            "give validation.shards=<held-out .tar shards> and validation.holdout_fraction=0, or more shards",
        )
    return shards


def _resumed_split(
    cfg: DictConfig, checkpoint: str | None, shards: list[str], fraction: float
) -> dict[str, Any] | None:
    """The split recorded by the run of `checkpoint` when it fits these settings; ConfigError when the settings would
    change it (unless resume_allow_changes, then None: a new split)."""
    if checkpoint is None:
        return None
    source = Path(checkpoint).absolute().parent.parent
    recorded = read_split(source)
    if recorded is not None and recorded.get("holdout_fraction") == fraction and recorded.get("data_shards") == shards:
        return recorded
    if cfg.get("resume_allow_changes"):
        return None
    if recorded is None:
        problem = (
            f"is {fraction}, but {checkpoint} trained on all of data.shards (its run recorded no {SPLIT_FILE}): "
            "holding shards out now would change what the run trains on"
        )
        fix = "validation.holdout_fraction=0 and validation.shards=<held-out shards> for this run, or name=<new run>"
    else:
        was = recorded.get("holdout_fraction")
        problem = (
            f"is {fraction}, but {checkpoint}'s run held out {len(recorded.get('held_out', []))} of "
            f"{len(recorded.get('data_shards', []))} shards with holdout_fraction={was} ({source / SPLIT_FILE}); "
            "a resume keeps that split"
        )
        fix = f"validation.holdout_fraction={was} with the run's data.shards, or name=<new run> (resume_allow_changes=true splits anew)"
    raise ConfigError(f"{KEY}.holdout_fraction", problem, fix)


def _data_kind(cfg: DictConfig) -> str:
    target = str(OmegaConf.select(cfg, "data._target_", default="") or "")
    return "folder" if "folder" in target else target.rsplit(".", 1)[-1] or "?"


def _as_list(shards: Any) -> Any:
    return list(shards) if OmegaConf.is_list(shards) or isinstance(shards, (list, tuple)) else shards


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low

"""A run's record of where its weights came from: `<run_dir>/lineage.json` and the frozen parts' file.

Written once when a run starts afresh, extended on every resume, read by every load of the run
(`sgm.checkpoint.model_source.load_model`) and by the resume itself:

- `parent`: the `pretrained` file (path, sha256, the parts loaded from it, its metadata), or null;
- `weights_at_start`: a sha256 per weight group ("unet", "vae", "text_encoder_<i>") as the run started;
- `trained`: the groups the run trains (they live in its training checkpoints);
- `frozen`: where each group that does not train comes from: `{"source": "pretrained"}` (the parent
  file) or `{"source": "frozen_parts.safetensors", "seed": N}` (initialised from the config under seed N
  and saved in that file beside lineage.json, so nobody re-derives it by re-seeding);
- `config`, `resumes`.

A load takes each frozen group from its source and checks it against `weights_at_start`: a parent file
that changed since, or a different frozen file, stops the load with a message instead of silently
giving other weights.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sgm.checkpoint.fingerprints import file_sha256, group_states, part_fingerprints, tensors_sha256, weight_group
from sgm.checkpoint.io import atomic_write, read_metadata
from sgm.checkpoint.official_layout import EMBEDDER_PREFIX, PARTS, UNET_PREFIX, VAE_PREFIX, split_official, to_official
from sgm.checkpoint.pretrained import load_pretrained

LINEAGE_FILE = "lineage.json"
FROZEN_FILE = "frozen_parts.safetensors"


class LineageError(RuntimeError):
    """A run whose recorded weight sources are missing or no longer hold the weights it trained with."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_lineage(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's lineage record, or None when it has none."""
    path = Path(run_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def part_of_group(group: str) -> str:
    """The official part a weight group belongs to ("text_encoder_1" -> "text_encoders")."""
    return "text_encoders" if group.startswith("text_encoder_") else group


def official_group(key: str) -> str | None:
    """The weight group of an official key."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(EMBEDDER_PREFIX):
        return f"text_encoder_{key[len(EMBEDDER_PREFIX) :].split('.')[0]}"
    return None


def trained_groups(state_keys: Iterable[str]) -> list[str]:
    """The weight groups a training checkpoint holds, from its module keys ("model.unet.x" -> "unet")."""
    groups = {weight_group(key.removeprefix("model.")) for key in state_keys if key.startswith("model.")}
    return sorted(g for g in groups if g is not None)


def parent_record(cfg: DictConfig) -> dict[str, Any] | None:
    """What the run starts from: the `pretrained` file, its sha256, the parts loaded, its metadata."""
    if not cfg.get("pretrained"):
        return None
    path = Path(str(cfg.pretrained)).absolute()
    parts = cfg.get("pretrained_parts")
    parts = [parts] if isinstance(parts, str) else parts
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "parts": list(PARTS if parts is None else parts),
        "metadata": dict(sorted(read_metadata(path).items())),
    }


def write_lineage(
    cfg: DictConfig,
    run_dir: str | os.PathLike,
    model: nn.Module,
    resumed_from: str | None,
    trained: Iterable[str] = ("unet",),
) -> Path:
    """Record a fresh start (parent, frozen parts and their file, fingerprints, config), or a resume.

    On resume the record keeps what the run started from and gains an entry in "resumes"; a parent
    file whose sha256 changed since the start raises LineageError and leaves the record as it was."""
    run_dir = Path(run_dir)
    existing = read_lineage(run_dir) if resumed_from else None
    parent = parent_record(cfg)
    if existing is not None:
        _check_same_parent(existing, parent, run_dir)
        record = existing
    else:
        record = _fresh_record(cfg, run_dir, model, parent, sorted(trained))
    if resumed_from:
        record["resumes"].append({"checkpoint": str(resumed_from), "at": _now()})
    return atomic_write(run_dir / LINEAGE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def _check_same_parent(existing: Mapping[str, Any], parent: Mapping[str, Any] | None, run_dir: Path) -> None:
    recorded = (existing.get("parent") or {}).get("sha256")
    if recorded == (parent or {}).get("sha256"):
        return
    was = f"{existing['parent']['path']} (sha256 {recorded[:12]}...)" if recorded else "no pretrained file"
    now = f"{parent['path']} (sha256 {parent['sha256'][:12]}...)" if parent else "no pretrained file"
    raise LineageError(
        f"this run started from {was} (see {run_dir / LINEAGE_FILE}) but resumes with {now}: the frozen "
        "parts would come from something else. Resume with the same, unchanged pretrained file, or "
        "start this run afresh (a new name=...)."
    )


def _fresh_record(
    cfg: DictConfig, run_dir: Path, model: nn.Module, parent: Mapping[str, Any] | None, trained: list[str]
) -> dict[str, Any]:
    """The start record; writes the frozen groups no file supplies into FROZEN_FILE."""
    from_parent = set(parent["parts"]) if parent else set()
    frozen: dict[str, dict[str, Any]] = {}
    for group in group_states(model):
        if group in trained:
            continue
        if part_of_group(group) in from_parent:
            frozen[group] = {"source": "pretrained"}
        else:
            frozen[group] = {"source": FROZEN_FILE, "seed": int(cfg.get("seed", 0))}
    saved = [g for g, where in frozen.items() if where["source"] == FROZEN_FILE]
    if saved:
        save_groups(model, saved, run_dir / FROZEN_FILE)
    else:
        (run_dir / FROZEN_FILE).unlink(missing_ok=True)
    return {
        "run_dir": str(run_dir.absolute()),
        "name": str(cfg.get("name")),
        "started": _now(),
        "parent": parent,
        "weights_at_start": part_fingerprints(model),
        "trained": trained,
        "frozen": frozen,
        "config_file": "config.yaml",
        "config": OmegaConf.to_container(cfg, resolve=True),
        "resumes": [],
    }


def save_groups(model: nn.Module, groups: Iterable[str], path: Path) -> Path:
    """The chosen weight groups' tensors in the official layout, in one file (atomically)."""
    groups = set(groups)
    parts = sorted({part_of_group(g) for g in groups}, key=PARTS.index)
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in to_official(model, parts).items() if official_group(k) in groups
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_groups(model: nn.Module, tensors: Mapping[str, Tensor], groups: Iterable[str]) -> None:
    """Load whole weight groups (strictly) from official-layout tensors."""
    groups = set(groups)
    split = split_official(tensors, PARTS)
    for group in groups:
        part = part_of_group(group)
        if part == "text_encoders":
            index = int(group.removeprefix("text_encoder_"))
            module = model.conditioner.embedders[index]
            own = split["text_encoders"].get(index, {})
            module.load_state_dict(module.from_official(own) if hasattr(module, "from_official") else own, strict=True)
        else:
            getattr(model, part).load_state_dict(split[part], strict=True)


def restore_frozen(
    model: nn.Module,
    run_dir: str | os.PathLike,
    record: Mapping[str, Any],
    skip: Iterable[str] = (),
    pretrained: str | os.PathLike | None = None,
) -> list[str]:
    """Put each frozen group of a run back from its recorded source and check it; returns the groups restored.

    skip: groups the caller fills otherwise (those in its checkpoint). pretrained: the parent file's
    new path when it moved (its weights must still be the recorded ones)."""
    run_dir = Path(run_dir)
    frozen = {g: where for g, where in (record.get("frozen") or {}).items() if g not in set(skip)}
    if record.get("frozen") is None:
        raise LineageError(
            f"{run_dir / LINEAGE_FILE} does not say where the run's frozen parts came from (a run made before "
            "frozen parts were recorded): train it again, or export it with the version that trained it."
        )
    from_parent = sorted(
        {part_of_group(g) for g, where in frozen.items() if where["source"] == "pretrained"}, key=PARTS.index
    )
    if from_parent:
        parent_path = Path(pretrained or (record.get("parent") or {}).get("path") or "")
        if not parent_path.is_file():
            raise LineageError(
                f"the run in {run_dir} took its {', '.join(from_parent)} from {parent_path}, which is gone: put the "
                "file back, or give its new path (--pretrained PATH)"
            )
        load_pretrained(model, parent_path, from_parent)
    from_file = [g for g, where in frozen.items() if where["source"] == FROZEN_FILE]
    if from_file:
        path = run_dir / FROZEN_FILE
        if not path.is_file():
            raise LineageError(f"{path} is missing: it holds the run's frozen {', '.join(from_file)} (lineage.json)")
        load_groups(model, load_file(str(path)), from_file)
    check_groups(model, frozen, record.get("weights_at_start") or {}, run_dir)
    return sorted(frozen)


def check_groups(model: nn.Module, groups: Iterable[str], expected: Mapping[str, str], run_dir: Path) -> None:
    """Refuse frozen weights that differ from the ones the run recorded at its start."""
    states = group_states(model)
    wrong = [g for g in groups if g in expected and tensors_sha256(states[g]) != expected[g]]
    if wrong:
        raise LineageError(
            f"the frozen {', '.join(wrong)} of the run in {run_dir} are not the weights it trained with (their "
            f"sha256 differs from {LINEAGE_FILE}): its pretrained file or {FROZEN_FILE} changed since. Restore "
            "the original file, or start a new run from the changed one."
        )

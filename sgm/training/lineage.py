"""Where a run's weights come from: start from a parent's file by part, and record that in lineage.json.

A run starts from an official-layout .safetensors file (`pretrained`: a released SDXL file or a
parent stage's `<name>_full.safetensors`), loading only the parts in `pretrained_parts`. Text
towers are matched by their keys and shapes, not by position, so a refiner (one bigG tower)
takes the bigG tower of a base file (CLIP-L + bigG) and ignores CLIP-L.

`<run_dir>/lineage.json` records the parent file (path, sha256, parts loaded, its metadata), a
sha256 of every part's weights as the run started, and the composed config. It is written when
a run starts afresh and only extended on resume, which refuses a parent that changed since
(the frozen parts are rebuilt from it, so a different file would silently change them).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import Tensor, nn

from sgm.checkpoint.io import (
    CheckpointMismatchError,
    LoadReport,
    atomic_write,
    compare_layout,
    load_official_state_dict,
    read_layout,
    read_metadata,
)
from sgm.checkpoint.official_layout import (
    EMBEDDER_PREFIX,
    OPTIONAL_MISSING_SUFFIXES,
    PARTS,
    check_parts,
    part_of_key,
    to_official,
)

LINEAGE_FILE = "lineage.json"
Shape = tuple[int, ...]


class LineageError(RuntimeError):
    """A resumed run whose parent file is no longer the one it started from."""


# -- loading a parent's weights by part ------------------------------------------------------------
def _towers(layout: Mapping[str, Shape]) -> dict[int, dict[str, Shape]]:
    """Official text-encoder keys grouped by embedder index: {index: {key under the index: shape}}."""
    towers: dict[int, dict[str, Shape]] = {}
    for key, shape in layout.items():
        index, _, sub = key[len(EMBEDDER_PREFIX) :].partition(".")
        if key.startswith(EMBEDDER_PREFIX) and index.isdigit():
            towers.setdefault(int(index), {})[sub] = shape
    return towers


def _fits(found: Mapping[str, Shape], wanted: Mapping[str, Shape]) -> bool:
    required = {k for k in wanted if not k.endswith(OPTIONAL_MISSING_SUFFIXES)}
    return required <= set(found) <= set(wanted) and all(found[k] == wanted[k] for k in found)


def match_text_towers(model: nn.Module, layout: Mapping[str, Shape]) -> dict[int, int] | None:
    """For each of the model's text towers, the file's tower with the same keys and shapes
    (the same index first); None when some tower has no match (the plain comparison then explains)."""
    wanted = _towers({k: tuple(v.shape) for k, v in to_official(model, ["text_encoders"]).items()})
    found = _towers(layout)
    mapping: dict[int, int] = {}
    for index, keys in sorted(wanted.items()):
        order = [index] + sorted(j for j in found if j != index)
        source = next((j for j in order if j not in mapping.values() and _fits(found.get(j, {}), keys)), None)
        if source is None:
            return None
        mapping[index] = source
    return mapping


def _renamed_keys(layout: Mapping[str, Shape], parts: tuple[str, ...], towers: dict[int, int] | None) -> dict[str, str]:
    """Model-side official key -> key in the file, for the selected parts (text towers remapped)."""
    names = {k: k for k in layout if part_of_key(k) in parts and part_of_key(k) != "text_encoders"}
    if "text_encoders" in parts:
        if towers is None:  # no remapping possible: compare the file as it is
            names.update({k: k for k in layout if part_of_key(k) == "text_encoders"})
        for target, source in (towers or {}).items():
            prefix = f"{EMBEDDER_PREFIX}{source}."
            for key in layout:
                if key.startswith(prefix):
                    names[f"{EMBEDDER_PREFIX}{target}.{key[len(prefix) :]}"] = key
    return names


def require_pretrained_file(path: str | os.PathLike) -> Path:
    """The `pretrained` path, or one clear error when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained={path}: no such file; give an official-layout .safetensors file "
            "(a released SDXL file or a run's <name>_full.safetensors)"
        )
    return path


def load_pretrained(model: nn.Module, path: str | os.PathLike, parts: Iterable[str] | None = None) -> LoadReport:
    """Load the chosen parts (default: all) of an official-layout file into an SDXL model.

    Reads only the tensors of those parts. A file that does not fit raises one
    CheckpointMismatchError naming the file, the parts and the settings to change."""
    path = require_pretrained_file(path)
    try:
        chosen = check_parts(PARTS if parts is None else [parts] if isinstance(parts, str) else parts)
    except ValueError as error:
        raise ValueError(f"pretrained_parts: {error}") from None
    layout = {key: shape for key, (shape, _) in read_layout(path).items()}
    towers = match_text_towers(model, layout) if "text_encoders" in chosen else None
    names = _renamed_keys(layout, chosen, towers)
    try:
        compare_layout(to_official(model, chosen), {k: layout[v] for k, v in names.items()}, chosen, str(path))
    except CheckpointMismatchError as error:
        details = str(error).split("\n  Fix:")[0]  # the library's fix names its own argument
        raise CheckpointMismatchError(
            f"pretrained={path} with pretrained_parts={list(chosen)}: {details}\n"
            "  Fix: set pretrained_parts to the parts of the file that fit this model (e.g. [text_encoders,vae] "
            "to start a refiner from a base file), or choose the model= config that matches the file "
            f"(python -m sgm.inspect {path} says which)."
        ) from None
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(source) for key, source in names.items()}
    return load_official_state_dict(model, tensors, chosen, source=str(path))


# -- fingerprints ----------------------------------------------------------------------------------
def tensors_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over sorted (key, shape, values); floats as float32, so an fp16 file and the fp32
    model it was loaded into give the same digest."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        tensor = (tensor.float() if tensor.is_floating_point() else tensor).cpu().contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def part_fingerprints(model: nn.Module) -> dict[str, str]:
    """sha256 of each part's current weights: "unet", "vae", "text_encoders.<i>" per tower with weights."""
    groups = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict()}
    for index, module in enumerate(model.conditioner.embedders):
        if module.state_dict():
            groups[f"text_encoders.{index}"] = module.state_dict()
    return {name: tensors_sha256(state) for name, state in groups.items()}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- lineage.json ----------------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_lineage(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's lineage record, or None when it has none."""
    path = Path(run_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def parent_record(cfg: DictConfig) -> dict[str, Any] | None:
    """What the run starts from: the `pretrained` file, its sha256, the parts loaded, its metadata."""
    if not cfg.get("pretrained"):
        return None
    path = Path(str(cfg.pretrained)).absolute()
    parts = cfg.get("pretrained_parts")
    return {"path": str(path), "sha256": file_sha256(path), "parts": list(PARTS if parts is None else parts),
            "metadata": dict(sorted(read_metadata(path).items()))}  # fmt: skip


def write_lineage(cfg: DictConfig, run_dir: str | os.PathLike, model: nn.Module, resumed_from: str | None) -> Path:
    """Record a fresh start (parent, start fingerprints, composed config), or extend the record on resume.

    On resume the record keeps what the run started from and gains an entry in "resumes"; a parent
    file whose sha256 changed since the start raises LineageError."""
    run_dir = Path(run_dir)
    existing = read_lineage(run_dir) if resumed_from else None
    parent = parent_record(cfg)
    if existing is not None:
        recorded = (existing.get("parent") or {}).get("sha256")
        if recorded != (parent or {}).get("sha256"):
            was = f"{existing['parent']['path']} (sha256 {recorded[:12]}...)" if recorded else "no pretrained file"
            now = f"{parent['path']} (sha256 {parent['sha256'][:12]}...)" if parent else "no pretrained file"
            raise LineageError(
                f"this run started from {was} (see {run_dir / LINEAGE_FILE}) but resumes with {now}: the frozen "
                "parts would be rebuilt from something else. Resume with the same, unchanged pretrained file, or "
                "start this run afresh (resume=null or a new run_dir)."
            )
        record = existing
    else:
        record = {"run_dir": str(run_dir.absolute()), "name": str(cfg.get("name")), "started": _now(),
                  "parent": parent, "weights_at_start": None if resumed_from else part_fingerprints(model),
                  "config_file": "config.yaml", "config": OmegaConf.to_container(cfg, resolve=True),
                  "resumes": []}  # fmt: skip
    if resumed_from:
        record["resumes"].append({"checkpoint": str(resumed_from), "at": _now()})
    target = run_dir / LINEAGE_FILE
    return atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))

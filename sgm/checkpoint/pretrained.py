"""Load an official-layout file into a model by part, matching text towers by keys and shapes.

A run starts from an official-layout .safetensors file (`pretrained`: a released SDXL file or a
parent stage's `<name>_full.safetensors`), loading only the parts in `pretrained_parts`. Text
towers are matched by their keys and shapes, not by position, so a refiner (one bigG tower)
takes the bigG tower of a base file (CLIP-L + bigG) and ignores CLIP-L.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import safe_open
from torch import nn

from sgm.checkpoint.io import (
    CheckpointMismatchError,
    LoadReport,
    compare_layout,
    load_official_state_dict,
    read_layout,
)
from sgm.checkpoint.official_layout import (
    EMBEDDER_PREFIX,
    OPTIONAL_MISSING_SUFFIXES,
    PARTS,
    check_parts,
    part_of_key,
    to_official,
)

Shape = tuple[int, ...]


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

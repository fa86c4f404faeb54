"""Read and write official-layout .safetensors files: atomic saves, clear mismatch errors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sgm.checkpoint.official_layout import (
    OPTIONAL_MISSING_SUFFIXES,
    PARTS,
    check_parts,
    part_of_key,
    split_official,
    to_official,
)

_SHOW = 8
SCALE_FACTOR_KEY = "sgm.scale_factor"  # metadata: the latent scale of the file's VAE (when not SDXL's 0.13025)
CAPTION_DROPOUT_KEY = "sgm.caption_dropout_rate"  # metadata: > 0 when the model learned "" (sampling guides against it)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


@dataclass
class LoadReport:
    """What a load did: the parts loaded and the extra tensors that were accepted."""

    parts: tuple[str, ...]
    loaded_keys: int
    extras: dict[str, Tensor] = field(default_factory=dict)


def _describe(title: str, items: list[str]) -> str:
    """One block of the mismatch report: a count per part, then the first few keys."""
    if not items:
        return ""
    by_part: dict[str, int] = {}
    for item in items:
        part = part_of_key(item.split(":")[0]) or "outside the model"
        by_part[part] = by_part.get(part, 0) + 1
    counts = ", ".join(f"{part}: {count}" for part, count in by_part.items())
    shown = "\n".join(f"    {item}" for item in items[:_SHOW])
    more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"\n  {title} ({len(items)}; {counts}):\n{shown}{more}"


def _shape_of(value: Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Tensor) else tuple(value)


def compare_layout(
    expected: Mapping[str, Tensor | tuple[int, ...]],
    found: Mapping[str, Tensor | tuple[int, ...]],
    parts: Iterable[str] = PARTS,
    source: str = "checkpoint",
) -> None:
    """Raise one CheckpointMismatchError listing missing, unexpected and shape-mismatched keys."""
    parts = check_parts(parts)
    found = {k: v for k, v in found.items() if part_of_key(k) in parts or part_of_key(k) is None}
    missing = sorted(k for k in expected if k not in found and not k.endswith(OPTIONAL_MISSING_SUFFIXES))
    split = split_official(found, parts)
    unexpected = sorted(k for k in found if k not in expected and part_of_key(k) is not None)
    unexpected += sorted(split["unexpected"])
    shapes = sorted(
        f"{k}: checkpoint {list(_shape_of(found[k]))} vs model {list(_shape_of(expected[k]))}"
        for k in expected
        if k in found and _shape_of(found[k]) != _shape_of(expected[k])
    )
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{source} does not fit the model (parts: {', '.join(parts)})."
            + _describe("missing keys", missing)
            + _describe("unexpected keys", unexpected)
            + _describe("shape mismatches", shapes)
            + "\n  Fix: pick the model config that matches the file (`python -m sgm.inspect FILE` says which), "
            "or load only the parts that match (parts=...)."
        )


def load_official_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], parts: Iterable[str] = PARTS, source: str = "checkpoint"
) -> LoadReport:
    """Load official-layout tensors into an SDXL model, for the chosen parts, all-or-nothing."""
    parts = check_parts(parts)
    compare_layout(to_official(model, parts), state_dict, parts, source)
    split = split_official(state_dict, parts)
    if "unet" in parts:
        model.unet.load_state_dict(split["unet"], strict=True)
    if "vae" in parts:
        model.vae.load_state_dict(split["vae"], strict=True)
    if "text_encoders" in parts:
        for index, module in enumerate(model.conditioner.embedders):
            own = split["text_encoders"].get(index, {})
            if hasattr(module, "from_official"):
                own = module.from_official(own)
            if own or module.state_dict():
                module.load_state_dict(own, strict=True)
    loaded = sum(len(split[p]) for p in ("unet", "vae")) + sum(len(v) for v in split["text_encoders"].values())
    return LoadReport(parts=parts, loaded_keys=loaded, extras=dict(split["optional"]))


def read_layout(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype) of a .safetensors file, read from its header without loading tensors."""
    path = _existing(path)
    layout = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
            tensor_slice = handle.get_slice(key)
            layout[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return layout


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a .safetensors header."""
    with safe_open(str(_existing(path)), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_checkpoint(model: nn.Module, path: str | os.PathLike, parts: Iterable[str] = PARTS) -> LoadReport:
    """Load an official-layout .safetensors file (base or refiner, whole or by part) into `model`."""
    path = _existing(path)
    parts = check_parts(parts)
    compare_layout(to_official(model, parts), {k: v[0] for k, v in read_layout(path).items()}, parts, str(path))
    return load_official_state_dict(model, load_file(str(path)), parts, source=str(path))


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    parts: Iterable[str] = PARTS,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write the chosen parts in the official layout, atomically (a crash never leaves half a file).

    dtype: cast floating tensors (e.g. torch.float16, as released); integer buffers keep theirs.
    """
    parts = check_parts(parts)
    tensors = dict(to_official(model, parts))
    tensors.update(extra_tensors or {})
    tensors = prepare_for_save(tensors, dtype)
    meta = {"format": "pt", "sgm.parts": json.dumps(list(parts))}
    meta.update(metadata or {})
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def prepare_for_save(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Detach, move to CPU, cast floats, and un-share storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        value = value.to("cpu").contiguous()
        pointer = value.untyped_storage().data_ptr() if value.numel() else None
        if pointer is not None and pointer in seen:
            value = value.clone()
        elif pointer is not None:
            seen.add(pointer)
        out[key] = value
    return out


def atomic_write(path: Path, write: callable) -> Path:
    """Run `write(tmp_path)` then rename over `path`: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path} (give the path to a .safetensors file)")
    return path

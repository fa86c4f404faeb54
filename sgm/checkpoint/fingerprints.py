"""Fingerprints of weights and files: what a run records about each part, and checks on every load."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


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


def weight_group(key: str) -> str | None:
    """The group a model-relative key belongs to: "unet", "vae" or "text_encoder_<i>" (one per tower, conditioner
    embedder i; the names module.trainable uses)."""
    if key.startswith("unet."):
        return "unet"
    if key.startswith("vae."):
        return "vae"
    if key.startswith("conditioner.embedders."):
        index = key.split(".")[2]
        return f"text_encoder_{index}" if index.isdigit() else None
    return None


def group_states(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Each weight group's module state: "unet", "vae", "text_encoder_<i>" per tower with weights."""
    groups = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict()}
    for index, module in enumerate(model.conditioner.embedders):
        if module.state_dict():
            groups[f"text_encoder_{index}"] = module.state_dict()
    return groups


def part_fingerprints(model: nn.Module) -> dict[str, str]:
    """sha256 of each weight group's current weights ("unet", "vae", "text_encoder_<i>")."""
    return {name: tensors_sha256(state) for name, state in group_states(model).items()}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file; for a directory (a sharded checkpoint), over its files' relative paths and digests."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
    return digest.hexdigest()

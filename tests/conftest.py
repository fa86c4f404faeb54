"""Shared fixtures: reference key lists, tiny models, offline settings."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root


def environment_extensions_dir() -> str:
    """A folder for DeepSpeed's JIT-compiled ops (shm_comm for the CPU DeepSpeed runs, cpu_adam) of this
    Python environment only. The default folder is shared by every environment of one Python and CUDA
    version, and each compiles with its own include paths: a fresh clone's .venv and the dev venv on one
    machine then rebuilt each other's ops on every run (about a minute per op)."""
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    return str(Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}-env-{tag}")


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", environment_extensions_dir())  # train.py subprocesses inherit it
# pytest-xdist runs the suite in 2 worker processes (pyproject addopts): one intra-op thread each, so the
# two share the CI machine's 2 cores instead of contending with 4 threads.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))

REFERENCE_DIR = Path(__file__).parent / "reference"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on the shared 2-core machine two threads contend and run
    many times slower (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_reference_layout(name: str) -> dict[str, tuple[int, ...]]:
    """Official key -> shape from tests/reference/<name>_keys.tsv (copied from the released files)."""
    layout = {}
    for line in (REFERENCE_DIR / f"{name}_keys.tsv").read_text().splitlines():
        key, _, shape = line.partition("\t")
        layout[key] = tuple(int(d) for d in shape.split(",") if d)
    return layout


@pytest.fixture(scope="session")
def base_reference() -> dict[str, tuple[int, ...]]:
    return read_reference_layout("sdxl_base")


@pytest.fixture(scope="session")
def refiner_reference() -> dict[str, tuple[int, ...]]:
    return read_reference_layout("sdxl_refiner")


def tiny_batch(batch_size: int = 2, size: int = 64, refiner: bool = False) -> dict:
    """A conditioning batch in the training layout, sizes as (h, w), crops as (top, left)."""
    captions = ["a red circle on a white background", "a blue square"][:batch_size]
    captions += [f"caption {i}" for i in range(len(captions), batch_size)]
    batch = {
        "txt": captions,
        "original_size_as_tuple": torch.tensor([[size * 2, size * 3]] * batch_size, dtype=torch.float32),
        "crop_coords_top_left": torch.tensor([[0, 8]] * batch_size, dtype=torch.float32),
    }
    if refiner:
        batch["aesthetic_score"] = torch.full((batch_size,), 6.0)
    else:
        batch["target_size_as_tuple"] = torch.tensor([[size, size]] * batch_size, dtype=torch.float32)
    return batch


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every floating parameter with noise, so zero-initialised layers also take part in checks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def fresh_tiny_model(seed: int = 0):
    """The tiny config, seeded, with its conditioner and VAE frozen as in training."""
    from sgm.models.build import build_model

    torch.manual_seed(seed)
    model = build_model("tiny")
    model.freeze_frozen_parts()
    return model

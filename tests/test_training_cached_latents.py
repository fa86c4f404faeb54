"""Training from cached latents and text embeddings: the VAE and text encoders are never run.

The real user path: an official file (here the seeded tiny model saved as one), the cache tool's
CLI run with that file, then train.py's composition with data=cached_latents and pretrained= the
same file, so the cache and the training model share their VAE and text encoders.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import fresh_tiny_model
from training_utils import REPO, compose_train, fast_overrides, make_shards

from sgm.checkpoint.io import save_checkpoint
from sgm.training.run import run


class FrozenPartCalls(pl.Callback):
    """Counts forward calls of the VAE encoder and the text encoders during training steps."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.active = False
        self.batch_keys: set[str] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        conditioner = pl_module.model.conditioner
        watched = {"vae.encoder": pl_module.model.vae.encoder}
        watched.update({f"text_encoder_{i}": conditioner.embedders[i] for i in conditioner.text_embedder_indices()})
        for name, module in watched.items():
            self.calls[name] = 0
            module.register_forward_hook(lambda *_, name=name: self._count(name))

    def _count(self, name: str) -> None:
        if self.active:
            self.calls[name] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.active = True
        self.batch_keys |= set(batch)

    def on_train_batch_end(self, *args) -> None:
        self.active = False


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, Path]:
    """(official tiny file, folder of cached shards made by data/cache_latents.py from it)."""
    root = tmp_path_factory.mktemp("cached")
    shards = make_shards(root / "images", num_samples=16, num_emoji=2, samples_per_shard=8)
    official = save_checkpoint(fresh_tiny_model(seed=5), root / "tiny.safetensors")
    command = [
        sys.executable,
        "data/cache_latents.py",
        f"{shards}/*.tar",
        "--out",
        str(root / "latents"),
        "--model",
        "tiny",
        "--checkpoint",
        str(official),
        "--square-size",
        "64",
        "--text-embeddings",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((root / "latents").glob("*.tar"))) == 2
    return Path(official), root / "latents"


def cached_overrides(run_dir: Path, official: Path, latents: Path, steps: int) -> list[str]:
    # the stage's square_size=64 stays: the loader checks it against the cache's settings
    common = [
        o for o in fast_overrides(run_dir, latents, max_steps=steps, every=steps) if not o.startswith("data.shards=")
    ]
    return common + [
        "data=cached_latents",
        f"data.shards={latents}/*.tar",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        f"pretrained={official}",
        "module.lr=2e-3",
        "module.warmup_steps=0",
        "model.conditioner.caption_dropout_rate=0.5",
    ]


def test_training_from_the_cache_never_runs_the_vae_or_text_encoders(cache, tmp_path) -> None:
    official, latents = cache
    steps = 24
    calls = FrozenPartCalls()
    cfg = compose_train(cached_overrides(tmp_path / "run", official, latents, steps) + ["module.offload_frozen=true"])
    outputs = run(cfg, extra_callbacks=[calls])
    assert outputs["global_step"] == str(steps)
    assert {"latents", "cached_embeddings"} <= calls.batch_keys and "jpg" not in calls.batch_keys
    assert calls.calls == {"vae.encoder": 0, "text_encoder_0": 0, "text_encoder_1": 0}
    with open(tmp_path / "run" / "logs" / "metrics.csv") as stream:
        losses = [float(row["train/loss"]) for row in csv.DictReader(stream) if row.get("train/loss")]
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first, f"loss did not fall on cached latents: {first:.3f} -> {last:.3f}"
    assert outputs["samples"].endswith(".png")  # prompts embedded and samples decoded by the offloaded parts


def test_offloading_the_frozen_parts_needs_cached_embeddings(tmp_path) -> None:
    shards = make_shards(tmp_path / "images", num_samples=8, num_emoji=2, samples_per_shard=8)
    cfg = compose_train(fast_overrides(tmp_path / "run", shards, max_steps=2) + ["module.offload_frozen=true"])
    with pytest.raises(ValueError, match="data=cached_latents"):
        run(cfg)


def test_a_stage_at_another_resolution_refuses_the_cache(cache, tmp_path) -> None:
    official, latents = cache
    cfg = compose_train(cached_overrides(tmp_path / "run", official, latents, 2) + ["data.square_size=128"])
    with pytest.raises(ValueError, match=r"made with \{'square_size': 64.*asks for \{'square_size': 128"):
        run(cfg)

"""The demo's decoder: a VAE for the tiny model, trained once on the demo shards and reused by later demo runs.

The tiny model's VAE is random at initialisation, so a demo that trained only the UNet would end with a grid
of coloured noise. `demo_vae` in the demo experiment asks for one trained by the project's own VAE trainer
(sgm.training.vae_training, as the conditioning study does); the run then starts from it like any other run
starting from a file: `pretrained=<file> pretrained_parts=[vae]` (the file's metadata gives the run its latent
scale factor), which lineage.json records as the VAE's source, so sampling, export and `load_model` of the run
use it.

The file is `<out>/vae-<key>.safetensors`, the key a hash of everything the VAE depends on: the training
shards' bytes, the data and VAE configs and the VAE training settings. A changed key trains a new file beside
the old ones (a run recorded with an old file can still be loaded and resumed); an unchanged key reuses it.
The file is written atomically (a killed training leaves no file that counts) under a lock, so runs started
together train it once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sgm.checkpoint.fingerprints import file_sha256
from sgm.checkpoint.io import SCALE_FACTOR_KEY, read_metadata
from sgm.data.folder import file_lock
from sgm.training.vae_training import VAETrainingSettings

SETTING_KEYS = tuple(asdict(VAETrainingSettings()))  # demo_vae keys passed to the trainer (steps, lr, ...)


@dataclass(frozen=True)
class DemoVAE:
    """A trained demo VAE: its file, latent scale factor, and whether this call trained it."""

    path: Path
    scale_factor: float
    trained_now: bool
    record: dict[str, Any]


def vae_settings(spec: Mapping[str, Any]) -> VAETrainingSettings:
    """The trainer's settings from a demo_vae block (its keys other than `out` and `batch_size`)."""
    defaults = asdict(VAETrainingSettings())
    unknown = sorted(set(spec) - set(defaults) - {"out", "batch_size"})
    if unknown:
        raise ValueError(f"unknown demo_vae key(s) {', '.join(unknown)}; known: out, batch_size, {', '.join(defaults)}")
    return VAETrainingSettings(**{k: type(defaults[k])(v) for k, v in spec.items() if k in defaults})


def training_config(cfg: DictConfig, spec: Mapping[str, Any]) -> DictConfig:
    """The run's config as the VAE trainer reads it (model, data, threads), with demo_vae.batch_size if given."""
    vae_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if spec.get("batch_size"):
        vae_cfg.data.batch_size = int(spec["batch_size"])
    return vae_cfg


def shards_sha256(pattern: str) -> dict[str, str]:
    """File name -> sha256 of every shard the pattern matches (the demo's few MB: read in well under a second)."""
    return {Path(path).name: file_sha256(path) for path in sorted(glob.glob(pattern))}


def demo_vae_key(vae_cfg: DictConfig, settings: VAETrainingSettings) -> dict[str, Any]:
    """What the trained VAE depends on: the shards' bytes, the data and VAE configs, the training settings."""
    data = OmegaConf.to_container(vae_cfg.data, resolve=True)
    return {
        "shards": shards_sha256(str(data["shards"])),
        "data": {k: v for k, v in data.items() if k not in ("shards", "num_workers")},
        "vae": OmegaConf.to_container(vae_cfg.model.vae, resolve=True),
        "settings": asdict(settings),
    }


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ensure_vae(cfg: DictConfig, spec: Mapping[str, Any]) -> DemoVAE:
    """The demo VAE for this run's model and data: reused when one with the same key exists, else trained now."""
    from sgm.training.vae_training import train_vae

    settings = vae_settings(spec)
    vae_cfg = training_config(cfg, spec)
    key = demo_vae_key(vae_cfg, settings)
    out = Path(str(spec["out"]))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"vae-{key_digest(key)}.safetensors"
    with file_lock(out / ".lock"):  # another run training the same file: wait for it, then reuse it
        if path.is_file():
            metadata = read_metadata(path)
            record = json.loads(metadata.get("sgm.vae_training", "{}"))
            return DemoVAE(path, float(metadata[SCALE_FACTOR_KEY]), False, record)
        started = time.time()
        with torch.random.fork_rng(devices=[]):  # the run's own random state stays as seeded
            record = train_vae(vae_cfg, path, settings)
        (out / f"{path.stem}_key.json").write_text(json.dumps({**key, "seconds": round(time.time() - started, 1)}))
    return DemoVAE(path, float(record["scale_factor"]), True, record)


def describe(vae: DemoVAE) -> str:
    """One line on the VAE a demo run uses."""
    curve = vae.record.get("curve") or [{}]
    l1 = curve[-1].get("l1_per_pixel")
    quality = f", L1/pixel {l1:.3f}" if l1 is not None else ""
    how = f"trained now in {vae.record.get('seconds', 0):.0f} s" if vae.trained_now else "reused"
    return (
        f"demo VAE {vae.path} ({how}: {vae.record.get('steps', '?')} steps of sgm.training.vae_training"
        f"{quality}; latent scale factor {vae.scale_factor:.5f})"
    )

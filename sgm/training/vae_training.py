"""Train the VAE of a (small) SDXL-layout model on image shards, when no released VAE fits the model.

    python -m sgm.training.vae_training --out outputs/vae.safetensors --steps 600 -- experiment=conditioning_study

The model and the data come from the same Hydra composition as `train.py` (the overrides after `--`), so
the VAE trained here is exactly the one the diffusion run builds: the run then loads it with
`pretrained=<out> pretrained_parts=[vae] model.scale_factor=<printed factor>`.

Objective (LDM's first stage without its perceptual and adversarial terms, which need downloaded
networks): per image, the summed L1 error of the pixels plus the summed L1 error of their horizontal and
vertical differences (keeps edges crisp, so blur in the data stays visible after decoding), plus
`kl_weight` x KL(posterior || N(0, I)), all divided by the batch size; Adam (`--patch-size N` trains on
one random N x N window per batch, cheaper for large images). The latent scale factor is
LDM's: 1 / std of posterior samples over the first batches (SDXL's own VAE has 0.13025).

Writes an official-layout file with the VAE tensors only (metadata: `sgm.scale_factor`, steps, losses)
and `<out stem>_training.json` with the loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from sgm import config_dir
from sgm.checkpoint.io import SCALE_FACTOR_KEY, save_checkpoint
from sgm.models.autoencoder import AutoencoderKL
from sgm.training.module import pixels_to_unit_range

CONFIG_DIR = config_dir()  # the shipped configs/ (train.py composes the same)


@dataclass(frozen=True)
class VAETrainingSettings:
    steps: int = 600
    lr: float = 5.0e-4
    warmup_steps: int = 20
    kl_weight: float = 1.0e-6
    scale_batches: int = 4  # batches whose posterior samples set the scale factor
    seed: int = 0
    log_every: int = 50
    patch_size: int = 0  # > 0: train on one random patch of this size per batch (the VAE is convolutional)


def compose_run_config(overrides: Sequence[str]) -> DictConfig:
    """The config `python train.py <overrides>` would run (model and data are what this trainer uses)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train", overrides=list(overrides))


def vae_loss(
    vae: AutoencoderKL, images: Tensor, kl_weight: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Per-image summed L1 (pixels + pixel differences) + kl_weight x KL, averaged over the batch."""
    posterior = vae.encode(images)
    reconstruction = vae.decode(posterior.sample(generator))
    batch = images.shape[0]
    pixels = (reconstruction - images).abs().sum() / batch
    edges = sum((reconstruction.diff(dim=dim) - images.diff(dim=dim)).abs().sum() / batch for dim in (2, 3))
    kl = 0.5 * (posterior.mean.pow(2) + posterior.std.pow(2) - 1.0 - posterior.logvar).sum() / batch
    total = pixels + edges + kl_weight * kl
    per_pixel = (reconstruction.detach() - images).abs().mean()
    return {"loss": total, "l1_per_pixel": per_pixel, "kl": kl.detach()}


@torch.no_grad()
def latent_scale_factor(
    vae: AutoencoderKL, batches: Sequence[Tensor], generator: torch.Generator | None = None
) -> float:
    """1 / std of posterior samples over the given image batches (LDM's recipe)."""
    latents = torch.cat([vae.encode(images).sample(generator).flatten() for images in batches])
    return float(1.0 / latents.std())


def random_patch(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random size x size window of the batch (the whole batch when it is not larger)."""
    height, width = images.shape[-2:]
    if size <= 0 or (size >= height and size >= width):
        return images
    top = int(torch.randint(0, max(1, height - size + 1), (1,), generator=generator))
    left = int(torch.randint(0, max(1, width - size + 1), (1,), generator=generator))
    return images[..., top : top + size, left : left + size]


def image_batches(loader: Any) -> Iterator[Tensor]:
    """Endless [-1, 1] image batches from a BucketedLoader (epoch after epoch)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield pixels_to_unit_range(batch["jpg"])
        if not yielded:
            raise ValueError("the data config yields no batches: check data.shards and data.batch_size")


def train_vae(cfg: DictConfig, out: str | Path, settings: VAETrainingSettings) -> dict[str, Any]:
    """Train cfg.model's VAE on cfg.data; write it to `out` (VAE tensors, official layout). Returns the record."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(settings.seed)
    model = instantiate(cfg.model)
    vae = model.vae.float().train().requires_grad_(True)
    loader = instantiate(cfg.data)(rank=0, world_size=1)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=settings.lr)
    warmup = max(1, settings.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    batches = image_batches(loader)
    curve: list[dict[str, float]] = []
    started = time.time()
    window: list[float] = []
    for step in range(1, settings.steps + 1):
        images = random_patch(next(batches), settings.patch_size, generator)
        losses = vae_loss(vae, images, settings.kl_weight, generator)
        if not math.isfinite(float(losses["loss"].detach())):
            raise FloatingPointError(f"VAE loss is {float(losses['loss'].detach())} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        schedule.step()
        window.append(float(losses["l1_per_pixel"]))
        if step % settings.log_every == 0 or step == settings.steps:
            point = {
                "step": step,
                "l1_per_pixel": sum(window) / len(window),
                "kl": float(losses["kl"]),
                "seconds": round(time.time() - started, 1),
            }
            curve.append(point)
            window = []
            print(
                f"[vae] step {step}: L1/pixel {point['l1_per_pixel']:.4f} (images in [-1, 1]), "
                f"KL {point['kl']:.1f}, {point['seconds']:.0f} s",
                flush=True,
            )
    vae.eval()
    scale = latent_scale_factor(vae, [next(batches) for _ in range(settings.scale_batches)], generator)
    loader.close()
    model.scale_factor = scale
    record = {
        "scale_factor": scale,
        "steps": settings.steps,
        "settings": asdict(settings),
        "curve": curve,
        "seconds": round(time.time() - started, 1),
    }
    out = Path(out)
    save_checkpoint(
        model, out, parts=["vae"], metadata={SCALE_FACTOR_KEY: repr(scale), "sgm.vae_training": json.dumps(record)}
    )
    out.with_name(f"{out.stem}_training.json").write_text(json.dumps(record, indent=2))
    print(f"[vae] wrote {out}; latent scale factor {scale:.5f} (pass model.scale_factor={scale:.5f})", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    defaults = VAETrainingSettings()
    for field in asdict(defaults):
        value = getattr(defaults, field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("overrides", nargs="*", help="train.py overrides choosing the model and data (after --)")
    args = parser.parse_args(argv)
    settings = VAETrainingSettings(**{f: getattr(args, f) for f in asdict(defaults)})
    train_vae(compose_run_config(args.overrides), args.out, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate images from a checkpoint, optionally handing the base model's latents to a refiner.

    python -m sgm.sample CKPT --prompt "a red heart" [--prompt ...] [--out outputs/samples] \
        [--lora LORA.safetensors[:SCALE] ...] [--refiner REFINER_CKPT --refiner-strength 0.15] \
        [--sampler dpmpp2m --steps 50 --guidance 5 --seed 0]

CKPT is a run directory (its newest checkpoint), a training checkpoint (a run's checkpoints/*.ckpt; EMA
weights unless --raw) or an official-layout .safetensors (exported or released), all loaded through
sgm.checkpoint.model_source.load_model (a run's frozen parts come from the sources it recorded). Image i (prompts in order, each repeated
--images-per-prompt times) uses seed + i, whatever the batch size, so any image can be made again
alone. Each PNG carries its settings as JSON under the "sgm" text key plus a readable "parameters".
Each --lora (kohya LoRA / LoCon file, scale default 1) is applied to the base model, not the refiner; a file
that does not fit the model exits with code 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sgm.checkpoint.kohya import LoRAFileError, apply_lora_file
from sgm.checkpoint.model_source import LoadedModel, load_model
from sgm.diffusion.discretization import sampling_sigmas
from sgm.diffusion.img2img import img2img_sigmas
from sgm.diffusion.samplers import DPMPP2MSampler, EulerEDMSampler, Sampler
from sgm.inference.generate import generate_latents, image_grid, latents_to_uint8
from sgm.inference.metadata import SAMPLER_NAMES, SETTINGS_KEY, parameters_text, save_png, settings


class SampleInputError(ValueError):
    """A user-supplied input (path, option) that sampling cannot use; the CLI prints it."""


SAMPLERS = {"euler": EulerEDMSampler, "dpmpp2m": DPMPP2MSampler}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_EXIT_CODE = 2  # a LoRA file that does not fit the model


def parse_lora(value: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE): the text after the last ':' is the scale only when it is a finite
    number, so paths holding ':' (C:\\loras\\x.safetensors) need no scale; the scale defaults to 1."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            if math.isfinite(scale):
                return path, scale
    return value, 1.0


def lora_arg(value: str) -> tuple[str, float]:
    """argparse type for --lora."""
    path, scale = parse_lora(value)
    if not path:
        raise argparse.ArgumentTypeError(f"{value!r}: give FILE or FILE:SCALE")
    return path, scale


def report_lora_error(error: LoRAFileError) -> SystemExit:
    """One message on stderr, no traceback; the SystemExit to raise carries exit code 2."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return SystemExit(LORA_EXIT_CODE)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sgm.sample", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run directory, training .ckpt or official-layout .safetensors")
    p.add_argument(
        "--model", help="model config name or .yaml (default: the run's config.yaml, or matched from the file)"
    )
    p.add_argument("--pretrained", help="official file supplying the parts CKPT lacks (text encoders, VAE)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA ones (training checkpoints)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=lora_arg,
        metavar="FILE[:SCALE]",
        help="kohya LoRA / LoCon .safetensors applied to the base model at SCALE (default 1); repeatable. "
        "With --refiner the adapters apply to the base model only, never to the refiner",
    )
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line (blank lines skipped)")
    p.add_argument("--negative-prompt", default="", help="empty: the base model's unconditional text is zeroed")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--sampler", choices=sorted(SAMPLER_NAMES), default="dpmpp2m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), help="default: the image size")
    p.add_argument("--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=(0, 0))
    p.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), help="default: the image size")
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="refiner conditioning")
    p.add_argument("--negative-aesthetic-score", type=float, default=2.5, help="refiner unconditional branch")
    p.add_argument("--refiner", help="refiner checkpoint (.ckpt or .safetensors): runs the last part of the schedule")
    p.add_argument("--refiner-model", help="the refiner's model config (default: inferred like --model)")
    p.add_argument("--refiner-pretrained", help="official file supplying the parts the refiner checkpoint lacks")
    p.add_argument("--refiner-strength", type=float, default=0.15, help="fraction of the schedule the refiner runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="UNet and text encoders (VAE: fp32); auto = bf16 on CUDA, fp32 elsewhere",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("outputs/samples"))
    p.add_argument(
        "--grid", action="store_true", help="also write grid.png (rows = prompts if --images-per-prompt > 1)"
    )
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the --prompts-file lines."""
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise SampleInputError(f"prompts file not found: {args.prompts_file} (one prompt per line)")
        prompts += [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SampleInputError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def check_options(args: argparse.Namespace) -> None:
    """Fail before loading anything on options out of range."""
    for name, value in (
        ("--steps", args.steps),
        ("--images-per-prompt", args.images_per_prompt),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise SampleInputError(f"{name} must be at least 1, got {value}")
    if args.refiner is not None:
        if not 0.0 < args.refiner_strength < 1.0:
            raise SampleInputError(f"--refiner-strength must be in (0, 1), got {args.refiner_strength}")
        if refiner_steps(args.steps, args.refiner_strength) < 1:
            enough = next((n for n in range(args.steps, 1001) if refiner_steps(n, args.refiner_strength)), None)
            raise SampleInputError(
                f"--refiner-strength {args.refiner_strength} of {args.steps} steps leaves the refiner no step; "
                + (f"use --steps {enough} or more, or " if enough else "use ")
                + "a larger --refiner-strength"
            )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SampleInputError("--device cuda: no CUDA device is available here; use --device cpu")


def check_size(args: argparse.Namespace, models: Sequence[LoadedModel]) -> None:
    """The image size must map to a latent grid the UNet takes: multiples of VAE factor x 2^(levels-1)."""
    for loaded in models:
        factor, levels = loaded.model.vae.downsampling_factor, loaded.model.unet.num_levels
        grain = factor * 2 ** (levels - 1)
        if args.height % grain or args.width % grain:
            near = [max(grain, round(v / grain) * grain) for v in (args.height, args.width)]
            raise SampleInputError(
                f"--height/--width {args.height}x{args.width}: {loaded.info['model']} takes multiples of {grain} "
                f"pixels (VAE factor {factor} x 2^{levels - 1} UNet downsamplings); try {near[0]}x{near[1]}"
            )


def refiner_steps(steps: int, strength: float) -> int:
    """How many of the schedule's steps a refiner of this strength runs (the tail img2img keeps)."""
    return len(img2img_sigmas(sampling_sigmas(steps), strength)) - 1


def make_sampler(args: argparse.Namespace) -> Sampler:
    try:
        return SAMPLERS[args.sampler](num_steps=args.steps)
    except ValueError as error:
        raise SampleInputError(f"--steps {args.steps}: {error}") from None


def to_device(loaded: LoadedModel, device: str, dtype: torch.dtype) -> None:
    """UNet and text encoders in `dtype`, VAE and the denoiser's sigma table in fp32, all on `device`."""
    loaded.model.unet.to(device, dtype)
    loaded.model.conditioner.to(device, dtype)
    loaded.model.vae.to(device, torch.float32)
    loaded.denoiser.to(device)


def generate(
    args: argparse.Namespace, base: LoadedModel, refiner: LoadedModel | None, prompts: list[str], seeds: list[int]
) -> torch.Tensor:
    """uint8 images [B, H, W, 3] for one batch: the base alone, or the base's first part then the refiner."""
    micro = {
        "original_size": tuple(args.original_size) if args.original_size else None,
        "crop_coords_top_left": tuple(args.crop_top_left),
        "target_size": tuple(args.target_size) if args.target_size else None,
    }
    common = dict(
        negative_prompts=[args.negative_prompt] * len(prompts),
        guidance_scale=args.guidance,
        seed=seeds,
        aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score,
        **micro,
    )
    strength = args.refiner_strength if refiner is not None else None
    latents = generate_latents(
        base.model,
        prompts,
        args.height,
        args.width,
        sampler=make_sampler(args),
        denoiser=base.denoiser,
        refiner_strength=strength,
        **common,
    )
    if refiner is None:
        return latents_to_uint8(base.model, latents)
    latents = generate_latents(
        refiner.model,
        prompts,
        args.height,
        args.width,
        sampler=make_sampler(args),
        denoiser=refiner.denoiser,
        init_latents=latents,
        strength=strength,
        add_noise=False,
        **common,
    )
    return latents_to_uint8(refiner.model, latents)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sample every image of the run; returns {"images": [paths], "grid": path or None}."""
    prompts = read_prompts(args)
    check_options(args)
    weights = "raw" if args.raw else "ema"
    base = load_model(args.checkpoint, weights=weights, model_config=args.model, pretrained=args.pretrained)
    refiner = None
    if args.refiner is not None:
        refiner = load_model(
            args.refiner, weights=weights, model_config=args.refiner_model, pretrained=args.refiner_pretrained
        )
    check_size(args, [m for m in (base, refiner) if m is not None])
    networks = [apply_lora_file(base.model, path, scale).eval() for path, scale in args.lora]
    for role, loaded in (("base", base), ("refiner", refiner)):
        if loaded is not None:
            info = loaded.info
            print(f"[sgm] {role}: {info['model']} from {info['checkpoint']} (weights: {info['weights']})", flush=True)
    for (path, scale), network in zip(args.lora, networks):
        print(f"[sgm] LoRA: {path} at scale {scale:g} ({len(network)} modules on {', '.join(network.parts)})")
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")
    for loaded in (base, refiner):
        if loaded is not None:
            to_device(loaded, args.device, DTYPES[dtype_name])
    for network in networks:
        network.to(args.device, torch.float32)  # adapters in fp32 whatever the model's dtype
    shared = settings(args, base, refiner, dtype_name, loras=args.lora)
    jobs = [(i, p) for i, p in enumerate(p for p in prompts for _ in range(args.images_per_prompt))]
    args.out.mkdir(parents=True, exist_ok=True)
    written, images = [], []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        seeds = [args.seed + index for index, _ in batch]
        pixels = generate(args, base, refiner, [prompt for _, prompt in batch], seeds)
        for (index, prompt), seed, image in zip(batch, seeds, pixels):
            meta = {"prompt": prompt, "seed": seed, "index": index, **shared}
            texts = {"parameters": parameters_text(meta), SETTINGS_KEY: json.dumps(meta)}
            written.append(save_png(Image.fromarray(image.numpy()), args.out / f"{index:05d}_seed{seed}.png", texts))
            print(f"  {written[-1]}", flush=True)
        images.append(pixels)
    grid = None
    if args.grid:
        columns = args.images_per_prompt if args.images_per_prompt > 1 else math.ceil(math.sqrt(len(jobs)))
        grid_meta = {
            **shared,
            "images": [{"file": p.name, "prompt": q, "seed": args.seed + i} for p, (i, q) in zip(written, jobs)],
        }
        grid = save_png(
            image_grid(torch.cat(images), columns), args.out / "grid.png", {SETTINGS_KEY: json.dumps(grid_meta)}
        )
    return {"images": written, "grid": grid}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except LoRAFileError as error:  # a LoRA that does not fit the model: exit code 2
        raise report_lora_error(error) from None
    except (ValueError, FileNotFoundError) as error:  # user-caused: one message, no traceback
        raise SystemExit(f"error: {error}") from None
    print(f"[sgm] wrote {len(result['images'])} image(s) to {args.out}/ (settings in each PNG's 'sgm' text key)")
    if result["grid"] is not None:
        print(f"[sgm] grid: {result['grid']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

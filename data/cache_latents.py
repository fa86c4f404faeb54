"""Precompute VAE latents (and text embeddings) of image shards once; train from them after.

    python data/cache_latents.py 'shards/{00000..00099}.tar' --out latents/ --model sdxl_base \\
        --checkpoint sd_xl_base_1.0.safetensors --base-resolution 1024 --text-embeddings
    torchrun --nproc-per-node 8 data/cache_latents.py ...       # ranks from $RANK / $WORLD_SIZE

Each input shard becomes one output shard of the same name (format: sgm/data/latent_loader.py),
cropped and bucketed exactly as image training would; finished shards are skipped on restart.
Train from the output with sgm.data.latent_loader.LatentLoader.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from sgm.data.latent_cache import (
    LATENT_MODES,
    STORAGE_DTYPES,
    VAE_DTYPES,
    CacheConfig,
    cache_latents,
    load_caching_model,
    rank_shards,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="input shards: paths, globs, brace ranges or URLs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the cached shards")
    parser.add_argument("--model", default="sdxl_base", help="model config name or YAML path (default sdxl_base)")
    parser.add_argument("--checkpoint", help="official-layout .safetensors (parts vae, text_encoders are loaded)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--base-resolution", type=int, help="multi-aspect SDXL bucket table at this base")
    size.add_argument("--square-size", type=int, help="one square bucket (the 256/512 stages)")
    parser.add_argument("--crop", choices=("random", "center"), default="random")
    parser.add_argument("--seed", type=int, default=0, help="crop and posterior-noise seed")
    parser.add_argument("--latent-mode", choices=LATENT_MODES, default="sample", help="posterior sample or mean")
    parser.add_argument("--vae-dtype", choices=VAE_DTYPES, default="float32", help="the VAE never runs in float16")
    parser.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default="float16")
    parser.add_argument("--text-embeddings", action="store_true", help="also store the text encoders' outputs")
    parser.add_argument("--min-size", type=int, help="skip images whose original shorter side is below this")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VAE call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", "0")))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = CacheConfig(
            model=args.model,
            checkpoint=args.checkpoint,
            base_resolution=args.base_resolution,
            square_size=args.square_size,
            crop=args.crop,
            seed=args.seed,
            latent_mode=args.latent_mode,
            vae_dtype=args.vae_dtype,
            storage_dtype=args.storage_dtype,
            text_embeddings=args.text_embeddings,
            min_size=args.min_size,
        )
        rank_shards(args.shards, args.rank, args.world_size)  # bad paths fail before the model loads
        model = load_caching_model(config, device=args.device)
        summary = cache_latents(
            model,
            args.shards,
            args.out,
            config,
            rank=args.rank,
            world_size=args.world_size,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    summary_path = args.out / f"_cache_summary_rank{args.rank}.json"
    summary_path.write_text(json.dumps(summary.to_dict(), indent=1))
    print(f"summary: {summary_path}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

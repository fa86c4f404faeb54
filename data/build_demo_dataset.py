"""Build the default demo dataset: real emoji, captioned with their Unicode names, in many sizes.

    python data/build_demo_dataset.py                       # 512 samples -> outputs/demo_data/
    python data/build_demo_dataset.py --num-samples 2048 --seed 1 --out /tmp/emoji

A command line over sgm.data.demo_dataset, which says what the images and captions hold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sgm.data import demo_dataset
from sgm.data.demo_dataset import DEMO_PACKAGE, build_demo_dataset
from sgm.data.shards import ShardError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"{__doc__}\n{demo_dataset.__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo_data"))
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--source", type=Path, default=None, help=f"font or emoji image folder (default: {DEMO_PACKAGE})"
    )
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--num-emoji", type=int, default=None, help="use only this many distinct emoji")
    parser.add_argument("--val-samples", type=int, default=0, help="also this many held-out images in OUT/val")
    args = parser.parse_args(argv)
    try:
        summary = build_demo_dataset(
            args.out, args.num_samples, args.seed, args.source, args.samples_per_shard, args.num_emoji, args.val_samples
        )
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary.written} demo samples in {len(summary.shards)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the conditioning study's synthetic dataset: one named shape in one named colour per image.

    python data/build_shapes_dataset.py                         # 2048 samples -> outputs/shapes_data/
    python data/build_shapes_dataset.py --num-samples 8192 --seed 1 --out /tmp/shapes

A command line over sgm.eval.shapes_dataset, which says what the images and their ground truth hold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sgm.data.shards import ShardError
from sgm.eval import shapes_dataset
from sgm.eval.shapes_dataset import MAX_SIDE, MIN_SIDE, build_shapes_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"{__doc__}\n{shapes_dataset.__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/shapes_data"))
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--min-side", type=int, default=MIN_SIDE, help="smallest long side in px")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="largest long side in px")
    args = parser.parse_args(argv)
    try:
        summary = build_shapes_dataset(
            args.out, args.num_samples, args.seed, args.samples_per_shard, args.min_side, args.max_side
        )
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary.written} shape samples in {len(summary.shards)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

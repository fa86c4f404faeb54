"""Build webdataset shards (img2dataset format) from a folder of captioned images or a manifest.

    python data/build_shards.py IMAGES_DIR --out shards/            # captions in sidecar .txt files
    python data/build_shards.py captions.csv --out shards/          # columns: path, caption
    python data/build_shards.py captions.jsonl --out shards/        # fields: path, caption
    python data/build_shards.py --check shards/ cc12m-00000.tar     # count samples in existing shards

Images are stored byte for byte (never re-encoded) under the extension of their real format.
Bad files are skipped and counted by reason; the summary at the end says which and why.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from sgm.data.shards import ShardError, build_shards, describe_shards, iter_folder, iter_manifest

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_size(text: str) -> int:
    """'500M', '1G', '1GiB', '123456' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 500M, 1G or 1000000")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="+", help="image folder, .csv or .jsonl manifest (with --check: shards)")
    parser.add_argument("--out", type=Path, help="folder for NNNNN.tar shards and NNNNN_stats.json")
    parser.add_argument("--samples-per-shard", type=int, default=10000)
    parser.add_argument("--max-shard-bytes", type=parse_size, default=None, help="e.g. 1G; default: no limit")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--full-decode", action="store_true", help="decode every image (catches truncated JPEGs)")
    parser.add_argument("--path-column", default="path", help="manifest column/field with the image path")
    parser.add_argument("--caption-column", default="caption", help="manifest column/field with the caption")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--check", action="store_true", help="describe existing shards instead of building")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.check:
            report = describe_shards(args.source)
            print(report.format())
            return 1 if report.errors else 0
        if len(args.source) != 1 or args.out is None:
            raise ShardError("building takes one source (folder, .csv or .jsonl) and --out FOLDER")
        source = Path(args.source[0])
        if not source.exists():
            raise ShardError(f"source {source} does not exist; pass an image folder or a .csv/.jsonl manifest")
        items = iter_folder(source) if source.is_dir() else iter_manifest(source, args.path_column, args.caption_column)
        summary = build_shards(
            items,
            args.out,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            overwrite=args.overwrite,
            full_decode=args.full_decode,
            progress=not args.no_progress,
        )
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    print(f"shards in {args.out} (summary: {json.dumps(str(args.out / '_build_summary.json'))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

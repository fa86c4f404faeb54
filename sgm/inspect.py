"""Inspect a model config or a .safetensors checkpoint.

python -m sgm.inspect sdxl_base            # parameter counts per component (built on meta)
python -m sgm.inspect sdxl_base --keys     # official-layout key<TAB>shape list
python -m sgm.inspect path/to/file.safetensors   # what the file holds and which model it matches
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sgm.checkpoint.io import read_layout, read_metadata
from sgm.checkpoint.matching import match_file, official_layout_of
from sgm.checkpoint.official_layout import part_of_key
from sgm.models.build import shipped_model_configs

_PART_PREFIX_DEPTH = {"unet": 2, "vae": 1, "text_encoders": 3}


def group_counts(layout: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
    """Official prefix (e.g. model.diffusion_model., conditioner.embedders.0.) -> (keys, elements)."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, shape in layout.items():
        part = part_of_key(key)
        prefix = ".".join(key.split(".")[: _PART_PREFIX_DEPTH[part]]) + "." if part else key
        numel = 1
        for dim in shape:
            numel *= dim
        totals[prefix][0] += 1
        totals[prefix][1] += numel
    return {k: (v[0], v[1]) for k, v in totals.items()}


def format_counts(layout: Mapping[str, Sequence[int]]) -> str:
    rows = group_counts(layout)
    width = max(len(k) for k in rows) + 2
    lines = [f"{'prefix':<{width}}{'keys':>7}{'parameters':>18}"]
    for prefix, (keys, numel) in sorted(rows.items()):
        lines.append(f"{prefix:<{width}}{keys:>7}{numel:>18,}")
    lines.append(f"{'total':<{width}}{len(layout):>7}{sum(n for _, n in rows.values()):>18,}")
    return "\n".join(lines)


def inspect_file(path: str) -> str:
    header = read_layout(path)
    layout = {k: shape for k, (shape, _) in header.items()}
    dtypes = sorted({dtype for _, dtype in header.values()})
    meta = read_metadata(path)
    extras = sorted(k for k in layout if part_of_key(k) is None)
    matches = match_file(layout)
    lines = [f"file: {path}", f"tensors: {len(layout)}  dtypes: {', '.join(dtypes)}", format_counts(layout)]
    if extras:
        lines.append("outside the model: " + ", ".join(extras))
    if meta:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    lines.append("matches: " + (", ".join(matches) if matches else "no shipped model config (compare with --keys)"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgm.inspect", description=__doc__.splitlines()[0])
    parser.add_argument(
        "target", help=f"model config ({', '.join(shipped_model_configs())}, or a .yaml) or a .safetensors file"
    )
    parser.add_argument("--keys", action="store_true", help="print the official-layout key<TAB>shape list")
    args = parser.parse_args(argv)
    try:
        if args.target.endswith(".safetensors"):
            if args.keys:
                for key, (shape, dtype) in read_layout(args.target).items():
                    print(f"{key}\t{','.join(map(str, shape))}\t{dtype}")
            else:
                print(inspect_file(args.target))
            return 0
        layout = official_layout_of(args.target)
        if args.keys:
            for key, shape in layout.items():
                print(f"{key}\t{','.join(map(str, shape))}")
        else:
            print(f"model config: {args.target}")
            print(format_counts(layout))
        return 0
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... --keys | head`: the reader left; nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush would raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())

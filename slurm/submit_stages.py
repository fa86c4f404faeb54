"""Submit SDXL's four training stages as chained SLURM jobs; prints `<stage> <job id>` per line.

    NODES=4 GPUS_PER_NODE=8 python slurm/submit_stages.py --root runs/sdxl [sbatch options --] [overrides]
    NODES=4 GPUS_PER_NODE=8 python slurm/submit_stages.py --root runs/sdxl --time=48:00:00 -- \\
        data=webdataset data.shards='/data/{00000..09999}.tar' trainer.precision=bf16-mixed

Each stage is one slurm/submit.sh job (same NODES, GPUS_PER_NODE, ... for all) held until its parent
ends successfully (--dependency=afterok), with the overrides of `sgm.training.stages.stage_overrides`:
run_dir <root>/<stage> and, after the first, pretrained= the parent's final exported weights. A failed
stage leaves its children pending forever (DependencyNeverSatisfied): scancel them, fix the cause and
submit again; `python -m sgm.training.stages --root <root>` shows the same overrides locally.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sgm.training.stages import STAGES, stage_overrides

SUBMIT = Path(__file__).resolve().parent / "submit.sh"


def parse_arguments(argv: Sequence[str]) -> tuple[Path, list[str], list[str]]:
    """(root, sbatch options, train.py overrides). Before a `--`: --root and sbatch options; after it:
    overrides. Without `--`, arguments that start with '-' are sbatch options (write them --opt=value)."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else None
    parser = argparse.ArgumentParser(prog="python slurm/submit_stages.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))  # fmt: skip
    parser.add_argument("--root", required=True, help="one folder per stage goes here (<root>/<stage>)")
    args, rest = parser.parse_known_args(argv if cut is None else argv[:cut])
    if cut is not None:
        return Path(args.root), rest, argv[cut + 1 :]
    return Path(args.root), [a for a in rest if a.startswith("-")], [a for a in rest if not a.startswith("-")]


def submit_chain(root: Path, overrides: Sequence[str], sbatch_options: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Submit every stage after its parent (afterok); returns [(stage, job id)] in order."""
    jobs: list[tuple[str, str]] = []
    plans = [(stage, stage_overrides(stage, root, overrides)) for stage in STAGES]  # all checked before any submit
    for stage, stage_args in plans:
        dependency = [f"--dependency=afterok:{jobs[-1][1]}"] if jobs else []
        environment = {**os.environ, "JOB_NAME": f"sgm-{stage}"}
        result = subprocess.run(["bash", str(SUBMIT), *dependency, *sbatch_options, "--", *stage_args],
                                check=False, capture_output=True, text=True, env=environment)  # fmt: skip
        if result.returncode != 0:
            submitted = ", ".join(f"{s} {j}" for s, j in jobs) or "none"
            raise RuntimeError(
                f"sbatch refused stage {stage}: {result.stderr.strip()} (already submitted: {submitted})"
            )
        jobs.append((stage, result.stdout.strip().split(";")[0]))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    root, sbatch_options, overrides = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        jobs = submit_chain(root, overrides, sbatch_options)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for stage, job in jobs:
        print(f"{stage} {job}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

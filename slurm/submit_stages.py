"""Submit SDXL's four training stages as chained SLURM jobs; prints `<stage> <job id>` per line.

    NODES=4 GPUS_PER_NODE=8 python slurm/submit_stages.py --root runs/sdxl [sbatch options --] [overrides]
    NODES=4 GPUS_PER_NODE=8 python slurm/submit_stages.py --root runs/sdxl --time=48:00:00 -- \\
        data=webdataset data.shards='/data/{00000..09999}.tar' trainer.precision=bf16-mixed

Each stage is one slurm/submit.sh job (same NODES, GPUS_PER_NODE, ... for all) held until its parent
ends successfully (--dependency=afterok), with the overrides of `sgm.training.stages.stage_overrides`:
run_dir <root>/<stage> and, after the first, pretrained= the parent's final exported weights. A failed
stage leaves its children pending forever (DependencyNeverSatisfied): scancel them, fix the cause and
submit again from that stage (`--stages multiaspect_1024,refiner`: the first one given starts from its
parent's final weights, which must exist); `python -m sgm.training.stages --root <root>` shows the same
overrides locally.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sgm.training.stages import STAGES, final_weights, parent_of, stage_overrides

SUBMIT = Path(__file__).resolve().parent / "submit.sh"


def parse_arguments(argv: Sequence[str]) -> tuple[Path, list[str], list[str], tuple[str, ...]]:
    """(root, sbatch options, train.py overrides, stages). Before a `--`: --root, --stages and sbatch options;
    after it: overrides. Without `--`, arguments that start with '-' are sbatch options (write them --opt=value)."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else None
    parser = argparse.ArgumentParser(
        prog="python slurm/submit_stages.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--root", required=True, help="one folder per stage goes here (<root>/<stage>)")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated consecutive stages to submit (default: all, from the first)",
    )
    args, rest = parser.parse_known_args(argv if cut is None else argv[:cut])
    stages = tuple(stage.strip() for stage in args.stages.split(",") if stage.strip())
    if cut is not None:
        return Path(args.root), rest, argv[cut + 1 :], stages
    options, overrides = [a for a in rest if a.startswith("-")], [a for a in rest if not a.startswith("-")]
    return Path(args.root), options, overrides, stages


def check_stages(stages: Sequence[str], root: Path) -> None:
    """Refuse a selection the chain cannot run: unknown names, gaps or another order than the pipeline's, or a
    first stage whose parent has not exported its final weights yet (its job would fail at start)."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        problem = f"unknown stage(s) {unknown}" if unknown else "no stage given"
        raise ValueError(f"--stages: {problem}; the stages are {', '.join(STAGES)}")
    first = STAGES.index(stages[0])
    if tuple(stages) != STAGES[first : first + len(stages)]:
        raise ValueError(
            f"--stages {','.join(stages)}: give consecutive stages in the order "
            f"{' -> '.join(STAGES)}, e.g. --stages {','.join(STAGES[first:])}"
        )
    parent = parent_of(stages[0])
    if parent is not None and not final_weights(parent, root).is_file():
        raise ValueError(
            f"--stages {','.join(stages)}: {stages[0]} starts from {final_weights(parent, root)}, "
            f"which does not exist yet; add {parent} to --stages"
        )


def submit_chain(
    root: Path, overrides: Sequence[str], sbatch_options: Sequence[str] = (), stages: Sequence[str] = STAGES
) -> list[tuple[str, str]]:
    """Submit each of `stages` after the one before it (afterok); returns [(stage, job id)] in order."""
    check_stages(stages, root)
    jobs: list[tuple[str, str]] = []
    plans = [(stage, stage_overrides(stage, root, overrides)) for stage in stages]  # all checked before any submit
    for stage, stage_args in plans:
        dependency = [f"--dependency=afterok:{jobs[-1][1]}"] if jobs else []
        environment = {**os.environ, "JOB_NAME": f"sgm-{stage}"}
        result = subprocess.run(
            ["bash", str(SUBMIT), *dependency, *sbatch_options, "--", *stage_args],
            check=False,
            capture_output=True,
            text=True,
            env=environment,
        )
        if result.returncode != 0:
            submitted = ", ".join(f"{s} {j}" for s, j in jobs) or "none"
            raise RuntimeError(
                f"sbatch refused stage {stage}: {result.stderr.strip()} (already submitted: {submitted})"
            )
        jobs.append((stage, result.stdout.strip().split(";")[0]))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    root, sbatch_options, overrides, stages = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        jobs = submit_chain(root, overrides, sbatch_options, stages)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for stage, job in jobs:
        print(f"{stage} {job}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

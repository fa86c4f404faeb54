"""Run SDXL's four training stages in sequence on one machine, each from its parent's final weights.

    python -m sgm.training.stages --tiny                # tiny models on the demo data, CPU, a few minutes
    python -m sgm.training.stages --root runs/sdxl data=webdataset data.shards='/data/{00000..09999}.tar' \\
        strategy=ddp trainer.precision=bf16-mixed     # the paper's recipe (configs/stage/*.yaml)
    python -m sgm.training.stages --root runs/sdxl --print-overrides refiner [overrides...]   # for sbatch

Stages: pretrain_256 -> pretrain_512 -> multiaspect_1024 (base model) and refiner. Each stage is one
`python -m sgm.train` process (what `python train.py` runs) with stage=<stage>, run_dir=<root>/<stage>,
name=<stage> and (after the first) pretrained=<root>/<parent>/<parent>_full.safetensors: the parent's
exported final weights (EMA when it has them), loaded by part (configs/stage/refiner.yaml takes only the
VAE and the text tower), with a fresh optimizer at step 0. A process per stage, not one process for
all: it is exactly what a SLURM job runs (sbatch chains use the same overrides), a DDP launch re-executes
its own command, and nothing leaks from one stage into the next (memory, seeds, threads).

A stage whose final weights exist is finished and skipped; an unfinished one resumes from its newest
checkpoint (resume=auto). Delete a stage's <stage>_full.safetensors to train it further or again.
Extra overrides go to every stage, except `pretrained` and `pretrained_parts`, which only start the
first stage (e.g. from released parts). An `experiment=NAME` whose folder configs/experiment/NAME/
holds <stage>.yaml files is given to each stage as experiment=NAME/<stage> (per-stage presets, such
as tiny_stages); without an experiment the stage configs run alone (not train.py's demo experiment).

With --eval-prompts (and --eval-reference/--inception for FID/KID, --clip-model/--clip-weights for the CLIP
score), each finished stage's final weights are evaluated by `python -m sgm.eval.metrics` on the same prompts,
reference set and settings into <root>/<stage>/eval/metrics.json, and <root>/stages_eval.md tables every stage's
metrics: what each stage bought. An evaluation is redone only when its command changed or the weights are newer.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sgm import config_dir  # no torch: the runner process only waits on its stages

STAGES: tuple[str, ...] = ("pretrain_256", "pretrain_512", "multiaspect_1024", "refiner")
RUNNER_KEYS = ("stage", "run_dir", "name", "model", "export.unet_only")  # set per stage; refused in extra
FIRST_STAGE_KEYS = ("pretrained", "pretrained_parts")  # where the pipeline starts: the first stage only
TINY_PRESET = "experiment=tiny_stages"
# The training entry point, run as a module so that an installed package (no checkout, no train.py) works.
TRAIN_MODULE = "sgm.train"
_PLAIN_VALUE = re.compile(r"^[\w./:@+-]+$", re.ASCII)
EVAL_MODULE = "sgm.eval.metrics"
EVAL_COMMAND_FILE = "command.json"  # beside each stage's eval/metrics.json: the evaluation it holds
EVAL_TABLE = "stages_eval.md"
EVAL_COLUMNS = ("fid", "kid_mean", "kid_std", "clip_score", "num_samples")


class StageError(RuntimeError):
    """A stage failed or left no final weights; the message says how to continue."""


def parent_of(stage: str) -> str | None:
    """The stage whose final weights this one starts from (None for the first)."""
    index = _index(stage)
    return STAGES[index - 1] if index > 0 else None


def final_weights(stage: str, root: str | Path) -> Path:
    """Where a stage's run exports its final weights: <root>/<stage>/<stage>_full.safetensors."""
    _index(stage)
    return Path(root).absolute() / stage / f"{stage}_full.safetensors"


def stage_overrides(stage: str, root: Path, extra: Sequence[str] = ()) -> list[str]:
    """The train.py overrides for one stage: stage, run_dir, name, the parent's final weights, then extra.

    Computable before the parent has run (the parent's path follows from root), so a job chain can
    prepare every stage up front."""
    _index(stage)
    keys = [_key(item) for item in extra]
    owned = [item for item, key in zip(extra, keys) if key in RUNNER_KEYS]
    if owned:
        raise ValueError(
            f"the stage runner sets {', '.join(RUNNER_KEYS)} for each stage; remove {owned} from the overrides "
            "(other models: an experiment with per-stage files, see configs/experiment/tiny_stages/)"
        )
    run_dir = Path(root).absolute() / stage
    overrides = [f"stage={stage}", f"run_dir={_hydra_value(str(run_dir))}", f"name={stage}"]
    parent = parent_of(stage)
    if parent is not None:
        overrides.append(f"pretrained={_hydra_value(str(final_weights(parent, root)))}")
    if "experiment" not in keys:
        overrides.append("~experiment")  # train.py's default experiment is the demo job
    for item, key in zip(extra, keys):
        if parent is not None and key in FIRST_STAGE_KEYS:
            continue
        overrides.append(_per_stage_experiment(item, stage) if key == "experiment" else item)
    return overrides


@dataclass(frozen=True)
class StageEval:
    """The evaluation every stage's final weights get: the same prompts, reference set and settings."""

    prompts: str
    reference: str | None = None
    inception: str | None = None
    clip_model: str | None = None
    clip_weights: str | None = None
    num_samples: int | None = None
    size: tuple[int, int] = (1024, 1024)
    steps: int = 30

    def arguments(self) -> list[str]:
        """The sgm.eval.metrics options (paths absolute: the same evaluation from any working directory)."""
        args = ["--prompts", _absolute(self.prompts)]
        for option, value in (
            ("--reference", self.reference),
            ("--inception", self.inception),
            ("--clip-model", self.clip_model),
            ("--clip-weights", self.clip_weights),
        ):
            if value is not None:
                args += [option, _absolute(value) if option != "--clip-model" or value.endswith(".json") else value]
        if self.num_samples is not None:
            args += ["--num-samples", str(self.num_samples)]
        return args + ["--height", str(self.size[0]), "--width", str(self.size[1]), "--steps", str(self.steps)]


def eval_command(stage: str, root: str | Path, evaluation: StageEval, python: str = sys.executable) -> list[str]:
    """The `python -m sgm.eval.metrics` command for one stage's final weights, into <root>/<stage>/eval."""
    weights = final_weights(stage, root)
    out = weights.parent / "eval"
    return [python, "-m", EVAL_MODULE, str(weights), *evaluation.arguments(), "--out", str(out)]


def evaluate_stage(stage: str, root: str | Path, evaluation: StageEval, python: str = sys.executable) -> Path:
    """Evaluate a finished stage (its eval/metrics.json) unless the same evaluation of the same weights is there."""
    weights = final_weights(stage, root)
    out = weights.parent / "eval"
    record, recorded = out / "metrics.json", out / EVAL_COMMAND_FILE
    command = eval_command(stage, root, evaluation, python)
    if (
        record.is_file()
        and recorded.is_file()
        and json.loads(recorded.read_text()) == command[1:]  # the interpreter may differ
        and record.stat().st_mtime_ns >= weights.stat().st_mtime_ns
    ):
        print(f"[sgm] stage {stage}: evaluated before, kept ({record})", flush=True)
        return record
    print(f"[sgm] stage {stage}: evaluating: {shlex.join(command)}", flush=True)
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise StageError(
            f"evaluation of stage {stage} failed (exit code {code}; its output is above). Fix the cause and run the "
            "same command again: trained stages are skipped."
        )
    recorded.write_text(json.dumps(command[1:]))
    return record


def eval_table(root: str | Path) -> str:
    """<root>/stages_eval.md's table: one row per stage with its metrics ("-" where not evaluated)."""
    lines = ["| stage | weights | " + " | ".join(EVAL_COLUMNS) + " |", "| --- " * (len(EVAL_COLUMNS) + 2) + "|"]
    for stage in STAGES:
        record = final_weights(stage, root).parent / "eval" / "metrics.json"
        metrics = json.loads(record.read_text())["metrics"] if record.is_file() else {}
        cells = [_cell(metrics.get(name)) for name in EVAL_COLUMNS]
        lines.append(f"| {stage} | {final_weights(stage, root).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_eval_table(root: str | Path) -> Path:
    """Write (and print) <root>/stages_eval.md."""
    table = eval_table(root)
    path = Path(root).absolute() / EVAL_TABLE
    path.write_text(f"# What each stage bought ({Path(root).absolute()})\n\n{table}")
    print(table, end="", flush=True)
    return path


def _cell(value: object) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _absolute(path: str) -> str:
    return path if "*" in path or "{" in path or path.startswith("pipe:") else str(Path(path).absolute())


def run_stages(
    root: str | Path, extra: Sequence[str] = (), python: str = sys.executable, evaluation: StageEval | None = None
) -> dict[str, Path]:
    """Run the unfinished stages in order, one `python -m sgm.train` process each, and evaluate each finished
    stage's final weights when `evaluation` is given; returns stage -> final weights."""
    root = Path(root).absolute()
    for number, stage in enumerate(STAGES, start=1):
        weights = final_weights(stage, root)
        if weights.is_file():
            print(f"[sgm] stage {number}/{len(STAGES)} {stage}: finished, skipped ({weights})", flush=True)
            if evaluation is not None:
                evaluate_stage(stage, root, evaluation, python)
            continue
        command = [python, "-m", TRAIN_MODULE, *stage_overrides(stage, root, extra)]
        print(f"[sgm] stage {number}/{len(STAGES)} {stage}: {shlex.join(command)}", flush=True)
        code = subprocess.run(command, check=False).returncode
        if code != 0:
            raise StageError(
                f"stage {stage} failed (exit code {code}; its output is above). Fix the cause and run the same "
                "command again: finished stages are skipped and this one resumes from its newest checkpoint."
            )
        if not weights.is_file():
            raise StageError(
                f"stage {stage} ended without writing {weights} (no checkpoint to export?); "
                f"see {weights.parent / 'outputs.json'}"
            )
        if evaluation is not None:
            evaluate_stage(stage, root, evaluation, python)
    if evaluation is not None:
        write_eval_table(root)
    return {stage: final_weights(stage, root) for stage in STAGES}


def report(root: str | Path) -> str:
    """Where each stage went: its run directory, final weights and lineage record."""
    lines = []
    for stage in STAGES:
        weights = final_weights(stage, root)
        lines.append(
            f"[sgm] {stage}: {weights.parent}  weights {weights.name}  lineage {weights.parent / 'lineage.json'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgm.training.stages",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--root",
        default=None,
        help="one folder per stage goes here (default: outputs/stages, outputs/stages_tiny with --tiny)",
    )
    parser.add_argument("--tiny", action="store_true", help=f"the tiny CPU preset ({TINY_PRESET})")
    parser.add_argument(
        "--print-overrides",
        metavar="STAGE",
        choices=STAGES,
        help="print that stage's train.py overrides on one line, shell-quoted, and exit",
    )
    evaluation = parser.add_argument_group("evaluate each stage (python -m sgm.eval.metrics; see its --help)")
    evaluation.add_argument("--eval-prompts", help="prompt file or caption shards: turns the evaluation on")
    evaluation.add_argument("--eval-reference", help="FID/KID reference images: image shards or a folder")
    evaluation.add_argument("--inception", help="local weights-inception-2015-12-05-6726825d.pth (FID/KID)")
    evaluation.add_argument("--clip-model", help="open_clip model for the CLIP score (ViT-L-14, ViT-bigG-14, .json)")
    evaluation.add_argument("--clip-weights", help="its local weights file")
    evaluation.add_argument("--eval-num-samples", type=int, help="images per stage (default: one per prompt)")
    evaluation.add_argument("--eval-size", type=int, nargs=2, default=(1024, 1024), metavar=("H", "W"))
    evaluation.add_argument("--eval-steps", type=int, default=30, help="sampler steps")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, as for train.py")
    args = parser.parse_args(argv)
    root = Path(args.root or ("outputs/stages_tiny" if args.tiny else "outputs/stages"))
    extra = [TINY_PRESET, *args.overrides] if args.tiny else list(args.overrides)
    try:
        if args.print_overrides:
            print(shlex.join(stage_overrides(args.print_overrides, root, extra)))
            return 0
        run_stages(root, extra, evaluation=stage_eval(args))
    except (ValueError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report(root), flush=True)
    return 0


def stage_eval(args: argparse.Namespace) -> StageEval | None:
    """The evaluation the options ask for (None without --eval-prompts); ValueError for a half-given pair."""
    if args.eval_prompts is None:
        if any(v is not None for v in (args.eval_reference, args.inception, args.clip_model, args.clip_weights)):
            raise ValueError("--eval-reference/--inception/--clip-model/--clip-weights need --eval-prompts")
        return None
    if (args.eval_reference is None) != (args.inception is None):
        raise ValueError("FID/KID need both --eval-reference and --inception")
    if (args.clip_model is None) != (args.clip_weights is None):
        raise ValueError("the CLIP score needs both --clip-model and --clip-weights")
    if args.inception is None and args.clip_model is None:
        raise ValueError("--eval-prompts: give --eval-reference and --inception and/or --clip-model and --clip-weights")
    return StageEval(
        args.eval_prompts,
        args.eval_reference,
        args.inception,
        args.clip_model,
        args.clip_weights,
        args.eval_num_samples,
        tuple(args.eval_size),
        args.eval_steps,
    )


def _index(stage: str) -> int:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return STAGES.index(stage)


def _key(override: str) -> str:
    """The config key an override sets ("+a.b=1" -> "a.b", "~experiment" -> "experiment")."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def _hydra_value(value: str) -> str:
    """A value as Hydra's override grammar reads it back unchanged (quoted when it holds odd characters)."""
    if _PLAIN_VALUE.match(value):
        return value
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # backslashes before a quote double
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


def _per_stage_experiment(override: str, stage: str) -> str:
    """experiment=NAME -> experiment=NAME/<stage> when configs/experiment/NAME/<stage>.yaml exists."""
    name = override.split("=", 1)[1].strip() if "=" in override else ""
    if name and (config_dir() / "experiment" / name / f"{stage}.yaml").is_file():
        return f"{override.split('=', 1)[0]}={name}/{stage}"
    return override


if __name__ == "__main__":
    raise SystemExit(main())

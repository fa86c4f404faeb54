"""Compare training runs: their overrides against their final metrics, and their curves in one plot.

    python -m sgm.eval.compare RUN_DIR... [--out DIR] [--weights ema|raw|both]

A RUN_DIR is a run directory (it holds config.yaml), a sweep's `<run_dir>/multirun` folder (or its
multirun.yaml, or the `<run_dir>` above it), which stands for its numbered jobs. Each run's overrides come from
the command that made it (.hydra/overrides.yaml); the table's columns are the overrides that DIFFER between the
runs (those shared by all go in one line above it), then the metrics: final step, train loss (mean over the last
10% of steps, from the CSV logger's metrics.csv), the last validation loss (validation.jsonl), the last FID, KID
and CLIP score of the in-training evaluations (metrics.jsonl) and of `python -m sgm.eval.metrics` (eval/
metrics.json), per weights (raw, EMA). The table is printed and written to compare.md; compare.png shows the
validation loss over steps (and FID in a second panel when any run has it), one colour per run, raw solid, EMA
dashed. A metric a run does not have yet is "-", with a note; a path that is not a run ends with one message and
exit code 2. Reads files only: nothing is imported from training, so it also runs beside a sweep in progress.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sgm.records import read_jsonl

RUN_CONFIG = "config.yaml"  # what every run directory holds (sgm.training.run.start_run_dir)
WEIGHTS = ("raw", "ema")
# metrics.jsonl / eval/metrics.json key -> column title
EVAL_METRICS = (("fid", "FID"), ("kid_mean", "KID"), ("clip_score", "CLIP"))
TRAIN_LOSS_TAIL = 0.1  # the train loss is averaged over this last fraction of the steps
MISSING = "-"


class NotARunError(ValueError):
    """A path given on the command line that is neither a run directory nor a sweep of runs."""


@dataclass
class RunRecord:
    """What one run wrote, as read from its directory."""

    path: Path
    overrides: dict[str, str]
    final_step: int | None = None
    train_loss: float | None = None
    validation: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # weights -> (step, loss)
    evaluations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # weights -> metrics.jsonl lines
    eval_metrics: dict[str, float] = field(default_factory=dict)  # eval/metrics.json's "metrics"


# -- finding runs ------------------------------------------------------------------------------------------
def _numbered_jobs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _sweep_folder(path: Path) -> Path | None:
    """The multirun folder `path` stands for: itself (numbered jobs or multirun.yaml), or `<path>/multirun`."""
    if path.is_file() and path.name == "multirun.yaml":
        return path.parent
    if not path.is_dir():
        return None
    if (path / "multirun.yaml").is_file() or _numbered_jobs(path):
        return path
    if (path / "multirun").is_dir():
        return _sweep_folder(path / "multirun")
    return None


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Path], Path | None, list[str]]:
    """The run directories `paths` stand for, the sweep folder when exactly one sweep was given (the default
    output folder), and notes on sweep jobs that have not written a run yet (not started, or stopped early)."""
    runs: list[Path] = []
    sweeps: list[Path] = []
    notes: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir() and (path / RUN_CONFIG).is_file():
            runs.append(path)
            continue
        if not path.exists():
            raise NotARunError(f"{path} does not exist: give a run's run_dir or a sweep's <run_dir>/multirun")
        sweep = _sweep_folder(path)
        if sweep is None:
            raise NotARunError(
                f"{path} is not a run directory (no {RUN_CONFIG}) nor a sweep (numbered job folders or "
                "multirun.yaml): give a run's run_dir or a sweep's <run_dir>/multirun"
            )
        sweeps.append(sweep)
        for job in _numbered_jobs(sweep):
            if (job / RUN_CONFIG).is_file():
                runs.append(job)
            else:
                notes.append(f"{job}: no {RUN_CONFIG} yet (job not started, or stopped before training)")
    if not runs:
        raise NotARunError(f"no run directory in {', '.join(str(p) for p in paths)} (no {RUN_CONFIG} in any job)")
    unique = list(dict.fromkeys(p.resolve() for p in runs))
    return unique, sweeps[0] if len(paths) == 1 and len(sweeps) == 1 else None, notes


# -- reading one run ---------------------------------------------------------------------------------------
def read_overrides(run: Path) -> dict[str, str]:
    """key -> value of the command-line overrides that made the run (Hydra's .hydra/overrides.yaml)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    overrides: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)):
        key, _, value = str(item).partition("=")
        overrides[key] = value
    return overrides


def csv_metrics_files(run: Path) -> list[Path]:
    """The CSV logger's metrics.csv files of a run (configs/logger/csv.yaml: <run_dir>/logs/metrics.csv;
    Lightning's own CSVLogger: <save_dir>/<name>/version_N/metrics.csv), the least recently written first."""
    found = [p for pattern in ("*/metrics.csv", "*/*/metrics.csv") for p in run.glob(pattern)]
    own = [p for p in found if p.parts[len(run.parts)] not in ("checkpoints", "multirun")]
    return sorted(own, key=lambda p: p.stat().st_mtime_ns)


def read_csv_column(files: Iterable[Path], column: str) -> dict[int, float]:
    """step -> value of one column; a step written twice (a resumed run redoing steps) keeps its later value."""
    values: dict[int, float] = {}
    for path in files:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get(column) not in (None, "") and row.get("step") not in (None, ""):
                    values[int(float(row["step"]))] = float(row[column])
    return values


def mean_of_tail(losses: dict[int, float], fraction: float = TRAIN_LOSS_TAIL) -> float | None:
    """The mean of the losses of the last `fraction` of the steps (at least the last step)."""
    if not losses:
        return None
    last = max(losses)
    first = last + 1 - max(1, math.ceil((last + 1) * fraction))
    tail = [loss for step, loss in losses.items() if step >= first]
    return sum(tail) / len(tail)


def _by_weights(lines: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Lines grouped by their weights ("raw" when unsaid), by step; a step written twice keeps its later line."""
    grouped: dict[str, dict[int, dict[str, Any]]] = {}
    for line in lines:
        if "step" in line:
            grouped.setdefault(str(line.get("weights", "raw")), {})[int(line["step"])] = line
    return {w: [steps[s] for s in sorted(steps)] for w, steps in grouped.items()}


def read_run(run: Path) -> RunRecord:
    """Everything the comparison shows of one run."""
    record = RunRecord(path=run, overrides=read_overrides(run))
    train = read_csv_column(csv_metrics_files(run), "train/loss")
    record.train_loss = mean_of_tail(train)
    validation = _by_weights(read_jsonl(run / "validation.jsonl"))
    record.validation = {w: [(int(x["step"]), float(x["loss"])) for x in lines] for w, lines in validation.items()}
    record.evaluations = _by_weights(read_jsonl(run / "metrics.jsonl"))
    eval_file = run / "eval" / "metrics.json"
    if eval_file.is_file():
        metrics = json.loads(eval_file.read_text()).get("metrics", {})
        record.eval_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    steps = [step + 1 for step in train]  # Lightning logs a training step under the number of steps before it
    steps += [step for series in record.validation.values() for step, _ in series]
    steps += [int(line["step"]) for lines in record.evaluations.values() for line in lines]
    outputs = run / "outputs.json"
    if outputs.is_file():
        steps.append(int(json.loads(outputs.read_text()).get("global_step", 0)))
    record.final_step = max(steps) if steps else None
    return record


# -- the table ---------------------------------------------------------------------------------------------
def split_overrides(records: Sequence[RunRecord]) -> tuple[dict[str, str], list[str]]:
    """The overrides every run shares (same value), and the keys whose value differs (or that some runs lack),
    in first-seen order."""
    keys = list(dict.fromkeys(k for r in records for k in r.overrides))
    shared = {}
    differing = []
    for key in keys:
        values = {r.overrides.get(key) for r in records}
        if len(values) == 1:
            shared[key] = records[0].overrides[key]
        else:
            differing.append(key)
    return shared, differing


def run_names(records: Sequence[RunRecord]) -> list[str]:
    """Short names: each run's path below the folder all runs share (its own name when it is alone)."""
    paths = [r.path for r in records]
    if len(paths) == 1:
        return [paths[0].name]
    root = Path(os.path.commonpath(paths))
    return [str(p.relative_to(root)) for p in paths]


def override_text(key: str, value: str) -> str:
    """An override as typed: key=value, or a bare deletion (~key)."""
    return key if key.startswith("~") and not value else f"{key}={value}"


def run_labels(records: Sequence[RunRecord], differing: Sequence[str]) -> list[str]:
    """A plot label per run: its differing overrides, or its name when no override differs."""
    names = run_names(records)
    labels = []
    for name, record in zip(names, records):
        parts = [override_text(k, record.overrides[k]) for k in differing if k in record.overrides]
        labels.append(" ".join(parts) or name)
    return labels


def override_cell(key: str, value: str | None) -> str:
    """A differing override's table cell: its value, "(default)" where the run did not set it."""
    if value is None:
        return "(default)"
    return value or ("(removed)" if key.startswith("~") else "''")


def _format(value: float | int | None) -> str:
    if value is None:
        return MISSING
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _last(lines: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [line[key] for line in lines if isinstance(line.get(key), int | float)]
    return float(values[-1]) if values else None


def build_table(records: Sequence[RunRecord], weights: Sequence[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and notes: one row per run, the differing overrides, then the metrics. Metric columns that
    no run has are left out, except the first validation loss column (a run without validation yet shows "-")."""
    _, differing = split_overrides(records)
    columns: list[tuple[str, list[float | int | None]]] = [
        ("step", [r.final_step for r in records]),
        ("train loss", [r.train_loss for r in records]),
    ]
    for w in weights:
        columns.append((f"val loss {w}", [r.validation[w][-1][1] if r.validation.get(w) else None for r in records]))
    for key, title in EVAL_METRICS:
        for w in weights:
            columns.append((f"{title} {w}", [_last(r.evaluations.get(w, []), key) for r in records]))
    for key, title in EVAL_METRICS:
        columns.append((f"{title} eval", [r.eval_metrics.get(key) for r in records]))
    first_val = f"val loss {weights[0]}"
    kept = [(t, v) for t, v in columns if t in ("step", "train loss", first_val) or any(x is not None for x in v)]
    header = ["run", *differing, *(t for t, _ in kept)]
    rows = []
    for i, (name, record) in enumerate(zip(run_names(records), records)):
        overrides = [override_cell(k, record.overrides.get(k)) for k in differing]
        rows.append([name, *overrides, *(_format(v[i]) for _, v in kept)])
    notes = []
    for name, record in zip(run_names(records), records):
        if not record.validation:
            notes.append(f"{name}: no validation yet (no validation.jsonl: validation.* unset, or not reached)")
        elif not any(record.validation.get(w) for w in weights):
            notes.append(
                f"{name}: no validation of the {'/'.join(weights)} weights (it has {', '.join(record.validation)})"
            )
        if record.train_loss is None:
            notes.append(f"{name}: no train loss (no metrics.csv: logger=csv writes it)")
    return header, rows, notes


def _escaped(cells: Sequence[str]) -> list[str]:
    return [str(c).replace("|", "\\|") for c in cells]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table padded to aligned columns, readable as printed text too."""
    header, rows = _escaped(header), [_escaped(row) for row in rows]
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def report_text(records: Sequence[RunRecord], weights: Sequence[str], notes: Sequence[str] = ()) -> str:
    """The shared overrides, the table and the notes, as printed and written to compare.md."""
    shared, _ = split_overrides(records)
    header, rows, table_notes = build_table(records, weights)
    shared_line = " ".join(override_text(k, v) for k, v in shared.items())
    parts = [f"Shared overrides: {shared_line or '(none)'}", "", markdown_table(header, rows)]
    all_notes = [*notes, *table_notes]
    if all_notes:
        parts += ["", *(f"- {note}" for note in all_notes)]
    return "\n".join(parts) + "\n"


# -- the plot ----------------------------------------------------------------------------------------------
def write_plot(records: Sequence[RunRecord], weights: Sequence[str], path: Path) -> Path:
    """compare.png: validation loss over steps (and FID when any run has it), a colour per run, raw solid and
    EMA dashed. Drawn on an Agg canvas of its own (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    _, differing = split_overrides(records)
    labels = run_labels(records, differing)
    has_fid = any(_last(r.evaluations.get(w, []), "fid") is not None for r in records for w in weights)
    figure = Figure(figsize=(12 if has_fid else 7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if has_fid else 1, squeeze=False)[0]
    styles = {"raw": "-", "ema": "--"}
    for index, (record, label) in enumerate(zip(records, labels)):
        for w in weights:
            suffix = f" ({w})" if len(weights) > 1 else ""
            series = record.validation.get(w, [])
            if series:
                steps, losses = zip(*series)
                axes[0].plot(steps, losses, styles[w], color=f"C{index % 10}", marker="o", lw=2, label=label + suffix)
            if has_fid:
                points = [(int(x["step"]), float(x["fid"])) for x in record.evaluations.get(w, []) if "fid" in x]
                if points:
                    steps, fids = zip(*points)
                    axes[1].plot(steps, fids, styles[w], color=f"C{index % 10}", marker="o", lw=2, label=label + suffix)
    titles = ["validation loss", "FID"][: len(axes)]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run has any yet", ha="center", va="center", transform=ax.transAxes)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# -- the command -------------------------------------------------------------------------------------------
def compare(paths: Sequence[str | Path], out: str | Path | None = None, weights: str = "both") -> dict[str, Any]:
    """Read the runs `paths` stand for, write compare.md and compare.png into `out` (default: the sweep folder
    when one sweep was given, else the current folder); returns the report text and the files written."""
    chosen = WEIGHTS if weights == "both" else (weights,)
    runs, sweep, notes = find_runs(paths)
    records = [read_run(run) for run in runs]
    folder = Path(out) if out is not None else (sweep or Path.cwd())
    text = report_text(records, chosen, notes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.md").write_text(text)
    plot = write_plot(records, chosen, folder / "compare.png")
    return {"text": text, "markdown": folder / "compare.md", "plot": plot, "runs": records}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sgm.eval.compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories, or a sweep's <run_dir>/multirun (its jobs)")
    p.add_argument("--out", help="where compare.md and compare.png go (default: the sweep folder, or .)")
    p.add_argument("--weights", choices=("ema", "raw", "both"), default="both", help="which weights' metrics")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = compare(args.runs, args.out, args.weights)
    except NotARunError as error:
        print(f"[sgm] error: {error}", file=sys.stderr)
        return 2
    print(result["text"], end="")
    print(f"[sgm] wrote {result['markdown']} and {result['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m sgm.eval.compare`: runs found (a sweep's jobs), their differing overrides as columns, final metrics
from the files runs write, the plot; and a real two-point sweep through train.py compared (the acceptance).

The unit tests write run directories by hand in the formats the training run writes (config.yaml,
.hydra/overrides.yaml, logs/metrics.csv, validation.jsonl, metrics.jsonl, eval/metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from omegaconf import OmegaConf
from PIL import Image
from training_utils import fast_overrides, make_shards, train_cli

from sgm.eval.compare import compare, main, mean_of_tail, read_run


def make_run(
    run: Path,
    overrides: list[str],
    validation: list[dict] = (),
    evaluations: list[dict] = (),
    train_losses: dict[int, float] | None = None,
    eval_metrics: dict | None = None,
) -> Path:
    """A run directory holding what a training run writes (only the files given)."""
    (run / ".hydra").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: {run.name}\n")
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    if validation:
        (run / "validation.jsonl").write_text("".join(json.dumps(line) + "\n" for line in validation))
    if evaluations:
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in evaluations))
    if train_losses:
        (run / "logs").mkdir()
        rows = [f"0,{step},{loss},0.001" for step, loss in train_losses.items()]
        (run / "logs" / "metrics.csv").write_text("epoch,step,train/loss,train/lr\n" + "\n".join(rows) + "\n")
    if eval_metrics:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps({"settings": {}, "metrics": eval_metrics}))
    return run


def val(step: int, loss: float, weights: str = "raw") -> dict:
    return {"step": step, "weights": weights, "loss": loss, "loss_by_bucket": [loss] * 2, "timesteps": [250, 750]}


def table_rows(text: str) -> list[list[str]]:
    """The cells of each Markdown table line of a report (header first)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_differing_overrides_are_columns_and_shared_ones_one_line_above(tmp_path):
    common = ["name=sweep", "trainer.max_steps=20"]
    make_run(tmp_path / "a", ["module.lr=0.001", *common], [val(10, 0.5)])
    make_run(tmp_path / "b", ["module.lr=0.0003", *common, "module.ema_decay=0.99", "~experiment"], [val(10, 0.4)])
    result = compare([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out")
    shared_line = result["text"].splitlines()[0]
    assert shared_line == "Shared overrides: name=sweep trainer.max_steps=20"
    header, *rows = table_rows(result["text"])
    assert header[:4] == ["run", "module.lr", "module.ema_decay", "~experiment"]
    assert rows == [
        ["a", "0.001", "(default)", "(default)", "10", "-", "0.5"],
        ["b", "0.0003", "0.99", "(removed)", "10", "-", "0.4"],
    ]
    assert header[4:] == ["step", "train loss", "val loss raw"]  # no run has EMA or FID: those columns left out
    assert (tmp_path / "out" / "compare.md").read_text() == result["text"]


def test_a_sweep_folder_stands_for_its_numbered_jobs(tmp_path, capsys):
    sweep = tmp_path / "run" / "multirun"
    for number, lr in enumerate(("0.001", "0.0003")):
        make_run(sweep / str(number), [f"module.lr={lr}", "name=x"], [val(4, 1.0 - number / 10)])
    (sweep / "2").mkdir()  # a job that has not started yet
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for given in (sweep, tmp_path / "run", sweep / "multirun.yaml"):
        assert main([str(given)]) == 0
        out = capsys.readouterr().out
        rows = table_rows(out)[1:]
        assert [row[:2] for row in rows] == [["0", "0.001"], ["1", "0.0003"]]
        assert f"{sweep / '2'}: no config.yaml yet" in out
        assert (sweep / "compare.md").is_file() and (sweep / "compare.png").is_file()  # default --out: the sweep


def test_final_metrics_read_from_the_run_files(tmp_path):
    losses = {step: float(step) for step in range(20)}  # steps 0..19: the last 10% are steps 18 and 19
    evaluations = [
        {"step": 10, "weights": "ema", "fid": 90.0, "kid_mean": 0.09, "kid_std": 0.01, "clip_score": 20.0},
        {"step": 20, "weights": "ema", "fid": 70.0, "kid_mean": 0.07, "kid_std": 0.01, "clip_score": 22.0},
    ]
    validation = [val(10, 0.9), val(10, 0.8, "ema"), val(20, 0.7), val(20, 0.6, "ema"), val(20, 0.65)]
    run = make_run(tmp_path / "r", ["name=r"], validation, evaluations, losses, {"fid": 55.0, "clip_score": 25.0})
    with (run / "validation.jsonl").open("a") as handle:
        handle.write('{"step": 30, "weights": "ra')  # a line cut off by a killed run
    record = read_run(run)
    assert record.final_step == 20 and record.train_loss == pytest.approx(18.5)
    assert record.validation["raw"] == [(10, 0.9), (20, 0.65)]  # step 20 written twice: the later line counts
    text = compare([run], out=tmp_path / "out", weights="both")["text"]
    header, row = table_rows(text)
    cells = dict(zip(header, row))
    assert cells["val loss raw"] == "0.65" and cells["val loss ema"] == "0.6"
    assert cells["FID ema"] == "70" and cells["KID ema"] == "0.07" and cells["CLIP ema"] == "22"
    assert cells["FID eval"] == "55" and cells["CLIP eval"] == "25" and "KID eval" not in cells
    assert "FID raw" not in cells  # no run has raw-weights FID
    raw_only = dict(zip(*table_rows(compare([run], out=tmp_path / "out", weights="raw")["text"])))
    assert "val loss ema" not in raw_only and "FID ema" not in raw_only and raw_only["val loss raw"] == "0.65"


def test_mean_of_tail_covers_the_last_tenth_of_the_steps():
    assert mean_of_tail({0: 5.0, 1: 3.0, 2: 1.0}) == 1.0  # 3 steps: at least the last
    assert mean_of_tail({s: float(s) for s in range(200)}) == pytest.approx(sum(range(180, 200)) / 20)
    assert mean_of_tail({}) is None


def test_runs_without_validation_or_logs_show_a_dash_and_a_note(tmp_path, capsys):
    make_run(tmp_path / "a", ["module.lr=0.1"])
    make_run(tmp_path / "b", ["module.lr=0.2"], [val(2, 0.5)], train_losses={0: 1.0, 1: 0.9, 2: 0.8, 3: 0.7})
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert table_rows(out)[1:] == [
        ["a", "0.1", "-", "-", "-"],
        ["b", "0.2", "4", "0.7", "0.5"],
    ]  # CSV step 3 = the 4th step
    assert "a: no validation yet" in out and "a: no train loss" in out and "b: no" not in out


@pytest.mark.parametrize("make", ["missing", "empty_dir", "a_file"])
def test_a_path_that_is_not_a_run_is_one_line_and_exit_2(tmp_path, capsys, make):
    path = tmp_path / "thing"
    if make == "empty_dir":
        path.mkdir()
    elif make == "a_file":
        path.write_text("x")
    make_run(tmp_path / "good", ["name=good"])
    assert main([str(tmp_path / "good"), str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and str(path) in captured.err


def colour_pixels(png: Path, colour: str) -> int:
    """How many pixels of the image have exactly this matplotlib colour."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    target = np.round(np.array(to_rgb(colour)) * 255).astype(int)
    return int((np.abs(pixels.astype(int) - target).max(axis=1) <= 1).sum())


def test_the_plot_draws_each_run_in_its_colour_and_adds_fid_when_present(tmp_path):
    rising = [val(s, 0.2 + s / 100) for s in range(0, 100, 10)]
    falling = [val(s, 1.2 - s / 100) for s in range(0, 100, 10)]
    make_run(tmp_path / "a", ["module.lr=0.1"], rising)
    make_run(tmp_path / "b", ["module.lr=0.2"], falling)
    png = compare([tmp_path / "a", tmp_path / "b"], out=tmp_path / "loss_only")["plot"]
    assert png.stat().st_size > 0
    loss_only = Image.open(png)
    counts = [colour_pixels(png, f"C{i}") for i in range(3)]
    assert counts[0] > 300 and counts[1] > 300 and counts[2] == 0  # two runs' lines, no third colour
    fid = {"step": 90, "weights": "raw", "fid": 40.0}
    make_run(tmp_path / "c", ["module.lr=0.3"], falling, [fid, {**fid, "step": 50, "fid": 60.0}])
    with_fid = Image.open(compare([tmp_path / "a", tmp_path / "c"], out=tmp_path / "fid")["plot"])
    assert with_fid.width > loss_only.width  # a second panel: FID over steps


@pytest.mark.slow
def test_two_point_demo_sweep_is_compared(tmp_path, capsys):
    """The acceptance: `python train.py -m module.lr=1e-3,3e-4 ...` with held-out validation on the tiny demo,
    then the comparison prints both points with their overrides and validation losses and writes the plot."""
    shards = make_shards(tmp_path / "shards", num_samples=32, num_emoji=2, samples_per_shard=8)  # 4 shards
    run_dir = tmp_path / "sweep"
    overrides = fast_overrides(run_dir, shards, max_steps=2, every=2) + [
        "samples.at_train_end=false",
        "validation.holdout_fraction=0.25",
        "validation.every_n_steps=1",
        "validation.max_samples=4",
        "validation.timestep_buckets=2",
    ]
    result = train_cli(["-m", "module.lr=1e-3,3e-4", *overrides], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert main([str(run_dir / "multirun")]) == 0
    out = capsys.readouterr().out
    header, *rows = table_rows(out)
    cells = [dict(zip(header, row)) for row in rows]
    assert [(c["run"], c["module.lr"], c["step"]) for c in cells] == [("0", "0.001", "2"), ("1", "0.0003", "2")]
    for c in cells:
        assert float(c["val loss raw"]) > 0 and float(c["val loss ema"]) > 0 and float(c["train loss"]) > 0
    assert "module.lr" not in out.splitlines()[0] and "trainer.max_steps=2" in out.splitlines()[0]
    png = run_dir / "multirun" / "compare.png"
    assert colour_pixels(png, "C0") > 100 and colour_pixels(png, "C1") > 100

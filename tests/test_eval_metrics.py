"""python -m sgm.eval.metrics end to end, and the metrics during training (sgm.training.eval_callback).

Everything is tiny and local: a tiny official file written here (random weights), a random-weights Inception
file in the standard format (sgm.eval.inception.write_random_weights; the real network's cost and code path),
a tiny CLIP given as an open_clip .json config with its weights, a prompt file and a folder of shapes images.
The numbers mean nothing; that they are finite, repeatable and land where they should is what is tested.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import tarfile

import pytest
import torch
from conftest import randomize_
from omegaconf import OmegaConf
from PIL import Image
from training_utils import compose_train, make_shards

from sgm.checkpoint.io import save_checkpoint
from sgm.checkpoint.model_source import load_model
from sgm.eval.clip_score import build_clip, tiny_clip_config
from sgm.eval.conditioning_metrics import SHAPES
from sgm.eval.inception import write_random_weights
from sgm.eval.metrics import EvalSettings, main, read_prompts, sample_images
from sgm.eval.shapes_dataset import COLOURS, caption_for, render_shape, sample_spec
from sgm.models.build import build_model
from sgm.training.eval_callback import in_job_order, pad_share
from sgm.training.preflight import ConfigError, check_resume
from sgm.training.run import run
from sgm.training.stages import StageEval, evaluate_stage, final_weights, write_eval_table

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model file, prompts, reference folder (5 shapes images, 40 px) and extractor files."""
    folder = tmp_path_factory.mktemp("eval")
    model = save_checkpoint(randomize_(build_model("tiny"), seed=1), folder / "tiny.safetensors")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    reference = folder / "reference"
    reference.mkdir()
    rng = random.Random(0)
    for i in range(5):
        shape, colour = SHAPES[i % 3], COLOURS[i % 4]
        pixels = render_shape(sample_spec(rng, shape, colour, 40, 40), 40, 40)
        Image.fromarray(pixels).save(reference / f"{i:02d}.png")
        (reference / f"{i:02d}.txt").write_text(caption_for(shape, colour))
    clip_config = folder / "tiny_clip.json"
    clip_config.write_text(json.dumps(tiny_clip_config()))
    torch.manual_seed(0)
    clip_weights = folder / "tiny_clip.pt"
    torch.save(build_clip(tiny_clip_config()).state_dict(), clip_weights)
    inception = write_random_weights(folder / "inception.pth")
    return {
        "model": model,
        "prompts": prompts,
        "reference": reference,
        "inception": inception,
        "clip_model": clip_config,
        "clip_weights": clip_weights,
        "cache": folder / "cache",
    }


def cli_args(files, out, *extra: str) -> list[str]:
    return [
        str(files["model"]),
        "--prompts", str(files["prompts"]),
        "--reference", str(files["reference"]),
        "--inception", str(files["inception"]),
        "--clip-model", str(files["clip_model"]),
        "--clip-weights", str(files["clip_weights"]),
        "--num-samples", "4",
        "--height", "32", "--width", "32", "--steps", "2", "--batch-size", "3",
        "--device", "cpu", "--model", "tiny",
        "--cache-dir", str(files["cache"]),
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def test_cli_writes_finite_repeatable_metrics_and_reuses_the_reference_cache(files, tmp_path, capsys):
    assert main(cli_args(files, tmp_path / "first")) == 0
    record = json.loads((tmp_path / "first" / "metrics.json").read_text())
    metrics = record["metrics"]
    assert set(metrics) == {"fid", "kid_mean", "kid_std", "clip_score", "num_samples"}
    assert metrics["num_samples"] == 4 and all(math.isfinite(v) for v in metrics.values())
    assert metrics["fid"] > 0 and 0 <= metrics["clip_score"] <= 100
    assert record["reference"]["count"] == 5 and record["prompts"]["count"] == 3
    assert record["model"]["fingerprints"]["unet"] and record["extractors"]["inception_is_standard"] is False
    assert record["settings"]["height"] == 32 and record["settings"]["sampler"] == "dpmpp2m"
    table = (tmp_path / "first" / "metrics.md").read_text()
    assert f"| fid | {metrics['fid']:.4f} |" in table and "| clip_score |" in table
    output = capsys.readouterr().out
    assert "[sgm] eval: 4/4 samples" in output and "ETA" in output

    cached = {p: p.stat().st_mtime_ns for p in files["cache"].iterdir()}
    assert len(cached) == 1
    assert main(cli_args(files, tmp_path / "second")) == 0
    again = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert again["metrics"] == metrics  # seeds fixed: the same images, the same numbers
    assert {p: p.stat().st_mtime_ns for p in files["cache"].iterdir()} == cached  # the reference was read back


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"source": "missing.safetensors"}, "no such model source"),
        ({"--inception": "missing.pth"}, "Inception-V3 weights (--inception) file"),
        ({"--clip-weights": "missing.bin"}, "CLIP weights (--clip-weights) file"),
        ({"--prompts": "empty.txt"}, "holds no prompt"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(files, tmp_path, capsys, change, expected):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = cli_args(files, tmp_path / "out")
    for key, value in change.items():
        index = 0 if key == "source" else args.index(key) + 1
        args[index] = str(tmp_path / value)
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and expected in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_images_do_not_depend_on_the_number_of_ranks(files):
    """Rank r samples images r, r + W, ...; put back in image order they are the one-rank images."""
    loaded = load_model(files["model"], model_config="tiny")
    settings = EvalSettings(num_samples=5, height=32, width=32, num_steps=2, batch_size=2)
    alone, prompts = sample_images(loaded.model, PROMPTS, settings, denoiser=loaded.denoiser)
    assert alone.shape == (5, 3, 32, 32) and alone.dtype == torch.uint8
    assert prompts == [PROMPTS[i % 3] for i in range(5)]
    shares = [sample_images(loaded.model, PROMPTS, settings, r, 2, loaded.denoiser)[0] for r in range(2)]
    assert [len(s) for s in shares] == [3, 2]
    assert torch.equal(in_job_order(torch.stack([pad_share(s, 5, 2) for s in shares]), 5), alone)


def train_overrides(run_dir, shards, *extra: str) -> list[str]:
    """A 2-step tiny run at 32 px without the demo experiment (its trained VAE and held-out loss cost time)."""
    return [
        "~experiment",
        "name=test",
        f"run_dir={run_dir}",
        "logger=csv",
        f"data.shards={shards}/*.tar",
        "data.base_resolution=null",
        "data.square_size=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "trainer.max_steps=2",
        "checkpoint.every_n_train_steps=2",
        "samples.at_train_end=false",
        "module.ema_decay=0.9",
        "threads=1",
        *extra,
    ]


def test_training_callback_logs_metrics_to_jsonl_and_csv(files, tmp_path):
    shards = make_shards(tmp_path / "shards", num_samples=8, num_emoji=2, samples_per_shard=8)
    run_dir = tmp_path / "run"
    overrides = train_overrides(
        run_dir,
        shards,
        "eval_metrics.every_n_steps=2",
        f"eval_metrics.prompts={files['prompts']}",
        f"eval_metrics.reference={files['reference']}",
        f"eval_metrics.inception={files['inception']}",
        f"eval_metrics.clip_model={files['clip_model']}",
        f"eval_metrics.clip_weights={files['clip_weights']}",
        f"eval_metrics.cache_dir={files['cache']}",
        "eval_metrics.num_samples=3",
        "eval_metrics.max_reference_images=null",  # as the CLI test's: the cached reference features are reused
        "eval_metrics.num_steps=2",
        "eval_metrics.height=32",
        "eval_metrics.width=32",
    )
    run(compose_train(overrides))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["weights"], line["num_samples"]) for line in lines] == [(2, "ema", 3)]
    assert all(math.isfinite(lines[0][k]) for k in ("fid", "kid_mean", "kid_std", "clip_score"))
    with open(run_dir / "logs" / "metrics.csv", newline="") as stream:
        rows = [row for row in csv.DictReader(stream) if row.get("eval/fid")]
    assert [(int(row["step"]), float(row["eval/fid"])) for row in rows] == [(2, lines[0]["fid"])]
    assert float(rows[0]["eval/clip_score"]) == lines[0]["clip_score"]


def test_missing_extractor_file_stops_training_at_start_naming_the_key(tmp_path):
    run_dir = tmp_path / "run"
    shards = make_shards(tmp_path / "shards", num_samples=8, num_emoji=2, samples_per_shard=8)
    overrides = train_overrides(
        run_dir,
        shards,
        "eval_metrics.every_n_steps=1",
        f"eval_metrics.inception={tmp_path / 'missing.pth'}",
        f"eval_metrics.reference={tmp_path}",
    )
    with pytest.raises(ConfigError) as caught:
        run(compose_train(overrides))
    assert caught.value.key == "eval_metrics.inception" and "github.com" in str(caught.value)
    assert not (run_dir / "config.yaml").exists()


def test_stage_runner_evaluates_a_finished_stage_once_and_tables_every_stage(files, tmp_path, capsys):
    root = tmp_path / "stages"
    weights = final_weights("pretrain_256", root)
    weights.parent.mkdir(parents=True)
    shutil.copy(files["model"], weights)  # a finished stage: its exported final weights
    evaluation = StageEval(
        str(files["prompts"]),
        clip_model=str(files["clip_model"]),
        clip_weights=str(files["clip_weights"]),
        num_samples=2,
        size=(32, 32),
        steps=2,
    )
    record = evaluate_stage("pretrain_256", root, evaluation)
    metrics = json.loads(record.read_text())["metrics"]
    assert record == weights.parent / "eval" / "metrics.json" and metrics["num_samples"] == 2
    assert evaluate_stage("pretrain_256", root, evaluation) == record  # the same evaluation: kept
    assert "evaluated before, kept" in capsys.readouterr().out
    table = write_eval_table(root).read_text()
    assert f"| pretrain_256 | pretrain_256_full.safetensors | - | - | - | {metrics['clip_score']:.4f} | 2 |" in table
    assert "| refiner | refiner_full.safetensors | - | - | - | - | - |" in table


def test_eval_metrics_keys_are_free_to_change_on_resume(tmp_path):
    base = train_overrides(tmp_path / "run", tmp_path / "shards")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(compose_train(base), resolve=True))
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    check_resume(compose_train([*base, "eval_metrics.every_n_steps=100", "eval_metrics.num_samples=8"]), checkpoint)
    with pytest.raises(ConfigError, match="module.lr"):  # the check itself still runs
        check_resume(compose_train([*base, "module.lr=1e-3"]), checkpoint)


def test_prompts_from_shards_are_the_first_captions_in_key_order(tmp_path):
    shards = make_shards(tmp_path / "shards", num_samples=6, num_emoji=2, samples_per_shard=3)
    keys_and_captions = []
    for url in sorted(shards.glob("*.tar")):
        with tarfile.open(url) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".txt")), key=lambda m: m.name)
            keys_and_captions += [tar.extractfile(m).read().decode().strip() for m in members]
    assert read_prompts(f"{shards}/*.tar", limit=4) == keys_and_captions[:4]
    assert read_prompts(f"{shards}/*.tar") == keys_and_captions

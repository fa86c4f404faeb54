"""The conditioning study end to end in its quick form (the pipeline, not the effect sizes), its VAE
trainer, and the report's verdict logic on numbers made up to be clear-cut."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from sgm.checkpoint.io import read_metadata
from sgm.eval import conditioning_study as study
from sgm.eval import study_report as report
from sgm.models.autoencoder import AutoencoderKL
from sgm.training.vae_training import latent_scale_factor, random_patch, vae_loss


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study")
    assert study.main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_study_runs_every_step_through_the_normal_paths(quick):
    out, record = quick
    settings = study.QUICK
    # the data: real shards of the generator, as many as asked for
    assert json.loads((out / "data" / "_build_summary.json").read_text())["written"] == settings.num_samples
    # the VAE: an official-layout file with VAE tensors only and its latent scale factor
    vae_path = Path(record["vae"]["path"])
    with safe_open(str(vae_path), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("first_stage_model.") for k in keys)
    assert float(read_metadata(vae_path)["sgm.scale_factor"]) == pytest.approx(record["vae"]["scale_factor"])
    # three train.py runs, each with its own conditioning, the study VAE and the step count asked for
    expected_keys = {
        "full": {"original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"},
        "no_crop": {"original_size_as_tuple", "target_size_as_tuple"},
        "no_size": {"crop_coords_top_left", "target_size_as_tuple"},
        "none": {"target_size_as_tuple"},
    }
    for variant in settings.variants:
        run = record["runs"][variant]
        assert run["global_step"] == str(settings.train_steps)
        config = OmegaConf.load(Path(run["run_dir"]) / "config.yaml")
        keys = {e.input_key for e in config.model.conditioner.embedders} - {"txt"}
        assert keys == expected_keys[variant]
        assert config.pretrained == str(vae_path) and list(config.pretrained_parts) == ["vae"]
        assert config.model.scale_factor == pytest.approx(record["vae"]["scale_factor"])
        assert config.data.crop == "random" and config.data.square_size == settings.resolution
        assert config.module.denoiser.scaling._target_.endswith("VScaling")  # the study's parametrization
        assert config.threads == max(1, settings.threads // settings.parallel_trainings)  # trained side by side
    # every condition scored on 12 prompts x seeds, each sample's analysis kept
    labels = [c["label"] for c in record["conditions"]]
    assert labels == [c.label for c in study.conditions(settings)] and len(set(labels)) == len(labels)
    for condition in record["conditions"]:
        assert condition["count"] == len(study.PROMPTS) * settings.seeds_per_prompt
        assert len(record["per_sample"][condition["label"]]) == condition["count"]
        images = np.load(out / condition["samples_file"])["images"]
        assert images.shape == (condition["count"], settings.resolution, settings.resolution, 3)
    # the verdicts cover the three effects; the report lists them and every condition; the figure has a row each
    effects = " ".join(v["effect"] for v in record["verdicts"])
    assert "(full vs none)" in effects and "size condition up to 64 px (full)" in effects
    assert "crop_left 0 -> 16 at original 128x256 shifts the framing: the object moves left (full)" in effects
    assert "colour" in effects
    text = (out / "report.md").read_text()
    assert "## Verdicts" in text and all(f"| {label} |" in text for label in labels)
    assert "## Verdicts\n\n**A --quick run: a pipeline check, not results.**" in text  # said before any verdict
    assert f"{settings.train_steps} steps" in text and "seed 0" in text and "v-prediction" in text
    # the calibration: training crops measured as loaded and through the VAE, each model's conditioning use
    calibration = record["calibration"]
    assert calibration["data"]["images"] >= settings.calibration_images
    assert calibration["data"]["crops"]["cut_all"]["count"] == calibration["data"]["images"]
    assert calibration["use_images"] == settings.use_images
    assert set(calibration["conditioning_use"]["full"]) == {"original_size_as_tuple", "crop_coords_top_left", "txt"}
    assert set(calibration["conditioning_use"]["none"]) == {"txt"}  # no size or crop input to swap
    assert "## Calibration" in text and "| full | crop |" in text and "| none | caption (yardstick) |" in text
    with Image.open(out / "samples.png") as figure:
        assert figure.size == (
            report.LABEL_WIDTH + len(study.PROMPTS) * settings.resolution,
            len(labels) * (settings.resolution + 2),
        )


@pytest.mark.slow
def test_a_rerun_reuses_finished_steps(quick):
    out, record = quick
    log = Path(record["runs"]["full"]["run_dir"]) / "train.log"
    before = log.read_text()
    vae = study.train_study_vae(out, study.QUICK)
    assert vae["path"] == record["vae"]["path"] and vae["scale_factor"] == record["vae"]["scale_factor"]
    assert study.train_variants(out, study.QUICK, vae)["full"]["global_step"] == str(study.QUICK.train_steps)
    assert log.read_text() == before  # no second train.py run
    report_text = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert study.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report_text
    # run again: only sampling and calibration are redone; the reused steps keep the times they took
    again = study.run_study(out, study.QUICK)
    assert again["reused_steps"] == ["data", "vae", "train_variants"]
    assert again["timings_seconds"]["train_variants"] == record["timings_seconds"]["train_variants"]
    assert again["timings_seconds"]["vae"] == record["vae"]["seconds"]
    assert "reused from an earlier run in this folder" in (out / "report.md").read_text()
    assert log.read_text() == before
    # a moved study folder still rewrites its report (its recorded paths follow it)
    moved = out.with_name(out.name + "_moved")
    out.rename(moved)
    try:
        assert study.main(["--report-only", "--out", str(moved)]) == 0
        assert str(moved / "runs") in json.loads((moved / "results.json").read_text())["runs"]["full"]["run_dir"]
    finally:
        moved.rename(out)


def test_a_failed_training_stops_the_study_and_shows_its_log(tmp_path):
    settings = study.QUICK  # no data under tmp_path: both train.py runs fail at start
    vae = {"path": str(tmp_path / "missing_vae.safetensors"), "scale_factor": 0.5}
    with pytest.raises(RuntimeError, match=r"training (full|none) failed \(exit [1-9]") as raised:
        study.train_variants(tmp_path, settings, vae)
    assert "end of" in str(raised.value) and "train.log" in str(raised.value)
    assert not (tmp_path / "runs" / "full" / "outputs.json").exists()


def test_vae_objective_falls_and_the_scale_factor_whitens_latents():
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    images = torch.zeros(4, 3, 32, 32)
    images[:, 0, 8:24, 8:24] = 1.0  # a red square
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(30):
        losses = vae_loss(vae, images, kl_weight=1e-6, generator=generator)
        first = first if first is not None else float(losses["l1_per_pixel"])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert float(losses["l1_per_pixel"]) < 0.5 * first
    scale = latent_scale_factor(vae, [images], generator)
    with torch.no_grad():
        latents = vae.encode(images).sample(generator) * scale
    assert float(latents.std()) == pytest.approx(1.0, rel=0.25)


def test_random_patch_is_a_window_of_the_batch():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patch = random_patch(images, 4, torch.Generator().manual_seed(1))
    assert patch.shape == (2, 3, 4, 4)
    top, left = divmod(int(patch[0, 0, 0, 0]), 8)
    assert torch.equal(patch, images[..., top : top + 4, left : left + 4])
    assert random_patch(images, 0, torch.Generator()) is images


def _condition(
    variant: str,
    size: int | tuple[int, int],
    crop: tuple[int, int],
    cut: list[list[str]],
    sharp: list[float],
    colours_right: int,
    centre_x: list[float] | None = None,
) -> dict:
    centre_x = centre_x or [0.5] * len(cut)
    samples = [
        {"object_found": True, "touches_border": bool(sides), "cut_sides": sides, "sharpness": s, "centre_yx": [0.5, x]}
        for sides, s, x in zip(cut, sharp, centre_x)
    ]
    count = len(samples)
    return {
        "variant": variant,
        "original_size": size,
        "crop": list(crop),
        "label": f"{variant} {size} {crop}",
        "count": count,
        "no_object": 0,
        "border_cut_fraction": sum(bool(c) for c in cut) / count,
        "colour_accuracy": colours_right / count,
        "shape_accuracy": 1.0,
        "samples": samples,
    }


def test_a_quick_report_says_its_verdicts_are_a_pipeline_check_not_results():
    quick = {"command": "python -m sgm.eval.conditioning_study --quick --out /tmp/s", "settings": asdict(study.QUICK)}
    note = report.quick_run_note(quick)
    assert "pipeline check, not results" in note[0] and f"trained {study.QUICK.train_steps} steps" in note[0]
    in_code = {"command": "python -m sgm.eval.conditioning_study", "settings": asdict(study.QUICK)}
    assert report.quick_run_note(in_code) == note  # run_study(out, QUICK) without the flag in its command
    full = {"command": "python -m sgm.eval.conditioning_study", "settings": asdict(study.StudySettings())}
    assert report.quick_run_note(full) == []


def test_verdicts_follow_the_numbers():
    n = 40
    whole, cut_left = [[]] * n, [["left"]] * n
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.1, n)
    centres = 0.5 + noise - noise.mean()
    wide = (256, 512)
    conditions = [
        _condition("full", 256, (0, 0), [["top"]] * 4 + whole[4:], [0.5] * n, n),
        _condition("full", wide, (0, 0), whole, [0.5] * n, n, list(centres + 0.2)),
        _condition("full", wide, (0, 32), whole, [0.5] * n, n, list(centres)),
        _condition("full", wide, (0, 64), cut_left, [0.5] * n, n, list(centres - 0.2)),
        _condition("no_size", wide, (0, 0), whole, [0.5] * n, n, list(centres)),
        _condition("no_size", wide, (0, 32), whole, [0.5] * n, n, list(centres + 0.05)),  # moves right: wrong way
        _condition("no_crop", 256, (0, 0), [["right"]] * 20 + whole[20:], [0.5] * n, 20),
        _condition("no_size", 256, (0, 0), [["top"]] * 10 + whole[10:], [0.5] * n, n),
        _condition("none", 256, (0, 0), [["top"]] * 8 + whole[8:], [0.5] * n, n),
        _condition("full", 32, (0, 0), whole, [0.2] * n, n),
        _condition("full", 128, (0, 0), whole, [0.4] * n, n),
        _condition("no_crop", 32, (0, 0), whole, [0.3] * n, n),
        _condition("no_crop", 128, (0, 0), whole, [0.3] * n, n),
    ]
    crop = report.crop_verdicts(conditions, 256)
    assert [v["status"] for v in crop] == [
        "NOT shown",  # no_size cuts 10 of 40, none 8
        "shown",  # full 4 vs no_crop 20: p < 0.001
        "direction only (p >= 0.05: within noise)",  # full 4 vs none 8: p = 0.1
    ]
    assert "4/40 = 10.0% vs 20/40 = 50.0%" in crop[1]["numbers"]
    shift = report.shift_verdicts(conditions, wide, [(0, 0), (0, 32), (0, 64)])
    assert [(v["effect"].split("(")[-1], v["status"]) for v in shift] == [("full)", "shown"), ("no_size)", "NOT shown")]
    assert "0: 0.70, 32: 0.50, 64: 0.30" in shift[0]["numbers"] and "-0.20 (p = 0" in shift[0]["numbers"]
    assert report.shift_verdicts(conditions, (256, 256), [(0, 0), (0, 32)]) == []  # the sweep is at `wide` only
    assert report.one_sided_p(4, 40, 20, 40) < 1e-3
    assert report.one_sided_p(20, 40, 20, 40) == 0.5
    size = report.size_verdicts(conditions, [32, 128, 256, 512], resolution=256)
    assert [(v["effect"].split("(")[-1], v["status"]) for v in size] == [("full)", "shown"), ("no_crop)", "NOT shown")]
    colour = report.colour_verdicts(conditions)
    assert [v["effect"].split("(")[-1].split(",")[0] for v in colour] == ["full", "no_size", "no_crop", "none"]
    assert [v["status"] for v in colour] == ["shown", "shown", "NOT shown", "shown"]  # no_crop: 20 + 40 + 40 of 120
    assert "100/120 = 83.3%" in colour[2]["numbers"]


def test_paired_sharpness_rise_needs_more_than_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(0.4, 0.05, 48)

    def condition(values):
        return {"samples": [{"object_found": True, "sharpness": float(v)} for v in values]}

    _, p_noise = report.paired_rise_p(condition(base), condition(base + rng.normal(0.0, 0.01, 48)))
    rise, p_real = report.paired_rise_p(condition(base), condition(base + 0.02 + rng.normal(0.0, 0.01, 48)))
    assert p_noise > 0.05
    assert p_real < 1e-6 and rise == pytest.approx(0.02, abs=0.005)

"""SDXL's conditioning effects in miniature (paper section 2.2), as one command on a CPU.

    python -m sgm.eval.conditioning_study                  # the full study (about 55 min on 2 cores)
    python -m sgm.eval.conditioning_study --quick --out /tmp/study   # the pipeline end to end in minutes
    python -m sgm.eval.conditioning_study --report-only          # rewrite report.md from results.json + samples

Steps (each skipped when its output is already there, so a rerun continues where it stopped):
1. the synthetic shapes data (sgm.eval.shapes_dataset): ground-truth objects saved at many sizes;
2. the study model's VAE, trained with sgm.training.vae_training (no released VAE fits a tiny model);
3. diffusion models through the normal training path (`python -m sgm.train`, what `train.py` runs),
   experiment=conditioning_study/<variant>:
   `full` (size + crop conditioning, as SDXL) and `none` by default, `no_crop` / `no_size` (one input
   each) with --variants; same data, seed, steps;
4. samples under each condition (same prompts and per-image seeds everywhere), scored by
   sgm.eval.conditioning_metrics (border cut, edge sharpness, colour and shape named in the prompt);
5. a calibration on training crops drawn through the same loader (sgm.eval.study_calibration): the
   measures on the crops and their VAE round trip, and how much each model's denoising error depends on
   the micro-conditioning it was given (whether it learned to use it at all);
6. `report.md` (tables + verdicts), `samples.png` (one row per condition) and `results.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from sgm.checkpoint.model_source import load_model
from sgm.diffusion.samplers import DPMPP2MSampler
from sgm.eval.conditioning_metrics import score_samples
from sgm.eval.shapes_dataset import FRAMING, build_shapes_dataset
from sgm.eval.study_calibration import conditioning_use, data_reference, training_crops
from sgm.eval.study_report import write_report
from sgm.inference import generate_latents, latents_to_uint8
from sgm.training.vae_training import VAETrainingSettings, compose_run_config, train_vae

# experiment=conditioning_study/<variant>: full (size + crop), no_crop, no_size, none (neither)
ALL_VARIANTS = ("full", "no_crop", "no_size", "none")
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PROMPTS = tuple(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)


@dataclass(frozen=True)
class StudySettings:
    """Everything the study's numbers depend on (written into results.json and the report)."""

    num_samples: int = 8192  # training images
    min_side: int = 24  # their long side, log-uniform in [min_side, max_side] px
    max_side: int = 256
    resolution: int = 64  # square random crops (experiment=conditioning_study)
    vae_steps: int = 1200
    vae_lr: float = 1.0e-3
    # the two the paper contrasts (SDXL's conditioning, and neither): no_size / no_crop isolate one input each
    # (--variants full no_size none); each model added costs about a third more training time
    variants: tuple[str, ...] = ("full", "none")
    train_steps: int = 3000  # per diffusion model
    lr: float = 1.0e-3
    batch_size: int = 16
    seed: int = 0
    seeds_per_prompt: int = 4  # samples per condition = 12 prompts x this
    sampler_steps: int = 20  # DPM++ 2M
    guidance_scale: float = 5.0
    reference_size: int = 128  # square original_size of the crop (0, 0) comparisons (a square is never cropped)
    # original_size_as_tuple (square) sweep: up to `resolution` training images of that size were upscaled
    # (the verdict's range); above it every one was downscaled, so no further rise is expected
    sizes: tuple[int, ...] = (24, 32, 48, 64, 128, 256)
    # crop_coords_top_left sweep at a wide original (h, w): at the training resolution only its width is cropped
    # (left 0..resolution), so these crops are ones the models saw, and they move a centred object across the frame
    shift_original: tuple[int, int] = (128, 256)
    crops: tuple[tuple[int, int], ...] = ((0, 0), (0, 32), (0, 64))
    threads: int = 2  # torch threads in all (the study's own process, the VAE; split between parallel trainings)
    parallel_trainings: int = 2  # variants trained at once
    calibration_images: int = 512  # training crops measured (and VAE round-tripped) for the data reference
    use_images: int = 256  # of those, the crops each model's conditioning use is measured on
    use_sigmas: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)  # noise levels of that measurement


QUICK = StudySettings(
    num_samples=64,
    vae_steps=3,
    variants=("full", "none"),
    train_steps=3,
    batch_size=4,
    seeds_per_prompt=1,
    sampler_steps=2,
    sizes=(32, 64, 256),
    crops=((0, 0), (0, 16)),
    calibration_images=16,
    use_images=8,
)


@dataclass(frozen=True)
class Condition:
    """One sampling condition: a model variant and the micro-conditioning values it is sampled with."""

    variant: str
    original_size: tuple[int, int]  # original_size_as_tuple (h, w)
    crop: tuple[int, int]  # crop_coords_top_left

    @property
    def label(self) -> str:
        height, width = self.original_size
        size = f"{height}" if height == width else f"{height}x{width}"
        return f"{self.variant} size={size} crop={self.crop[0]},{self.crop[1]}"


def conditions(settings: StudySettings) -> list[Condition]:
    """Every (variant, size, crop) the report's tables need, once each: crop (0, 0) at the square reference
    size for every variant; the crop sweep at the wide original for the crop-conditioned ones; the size sweep
    (square, crop (0, 0)) for the size-conditioned ones. A model without size (crop) conditioning ignores the
    size (crop) it is passed."""
    ref, wide, origin = (settings.reference_size,) * 2, tuple(settings.shift_original), (0, 0)
    wanted = [Condition(variant, ref, origin) for variant in ALL_VARIANTS]
    wanted += [Condition(variant, wide, crop) for variant in ("full", "no_size") for crop in settings.crops]
    wanted += [Condition(variant, (size, size), origin) for variant in ("full", "no_crop") for size in settings.sizes]
    return [c for c in dict.fromkeys(wanted) if c.variant in settings.variants]


def build_data(out: Path, settings: StudySettings) -> bool:
    """The shapes shards under out/data (kept when built with the same settings); True when built now."""
    stamp = out / "data" / "_study_data.json"
    wanted = {k: getattr(settings, k) for k in ("num_samples", "seed", "min_side", "max_side")}
    wanted["framing"] = list(FRAMING)  # data from before objects were framed near the centre is rebuilt
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return False

    build_shapes_dataset(
        out / "data",
        settings.num_samples,
        settings.seed,
        samples_per_shard=256,
        min_side=settings.min_side,
        max_side=settings.max_side,
    )
    stamp.write_text(json.dumps(wanted))
    return True


def common_overrides(out: Path, settings: StudySettings) -> list[str]:
    """train.py overrides every variant shares (the VAE's are added once it exists)."""
    return [
        f"data.shards={out / 'data'}/*.tar",
        f"data.square_size={settings.resolution}",
        f"data.batch_size={settings.batch_size}",
        f"module.lr={settings.lr}",
        f"seed={settings.seed}",
        f"samples.height={settings.resolution}",
        f"samples.width={settings.resolution}",
    ]


def train_study_vae(out: Path, settings: StudySettings) -> dict[str, Any]:
    """The study VAE (out/vae/study_vae.safetensors) and its record; reused when trained with these settings."""
    path = out / "vae" / "study_vae.safetensors"
    record_path = path.with_name(f"{path.stem}_training.json")
    vae_settings = VAETrainingSettings(
        steps=settings.vae_steps, lr=settings.vae_lr, seed=settings.seed, log_every=max(1, settings.vae_steps // 12)
    )
    if path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == asdict(vae_settings):
            return {**record, "path": str(path), "reused": True}
    cfg = compose_run_config(
        ["experiment=conditioning_study", *common_overrides(out, settings), f"threads={settings.threads}"]
    )
    record = train_vae(cfg, path, vae_settings)
    return {**record, "path": str(path), "reused": False}


def _finished_run(run_dir: Path, settings: StudySettings) -> dict[str, Any] | None:
    """The run's outputs.json content if it reached settings.train_steps, else None."""
    outputs = run_dir / "outputs.json"
    record = json.loads(outputs.read_text()) if outputs.is_file() else {}
    return record if record.get("global_step") == str(settings.train_steps) else None


def _variant_command(out: Path, variant: str, settings: StudySettings, vae: dict[str, Any], threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sgm.train",
        f"experiment=conditioning_study/{variant}",
        f"run_dir={out / 'runs' / variant}",
        *common_overrides(out, settings),
        f"threads={threads}",
        f"trainer.max_steps={settings.train_steps}",
        f"checkpoint.every_n_train_steps={max(1, settings.train_steps // 3)}",
        f"pretrained={vae['path']}",
        "pretrained_parts=[vae]",
        f"model.scale_factor={vae['scale_factor']!r}",
    ]


def train_variants(out: Path, settings: StudySettings, vae: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Train every variant with `python -m sgm.train experiment=conditioning_study/<variant>`, up to
    settings.parallel_trainings at once, each with threads // parallel_trainings torch threads (a model
    this small keeps a core busier per process: three single-threaded runs side by side made 3.9 steps/s
    in all on 2 cores). A finished run is reused; a stopped one resumes (resume=auto); a failed one stops
    the others and raises with the end of its log. Returns each variant's outputs.json content."""
    runs = {v: done for v in settings.variants if (done := _finished_run(out / "runs" / v, settings))}
    waiting = [v for v in settings.variants if v not in runs]
    slots = max(1, settings.parallel_trainings)
    threads = max(1, settings.threads // slots)
    running: dict[str, subprocess.Popen] = {}
    try:
        while waiting or running:
            while waiting and len(running) < slots:
                variant = waiting.pop(0)
                command = _variant_command(out, variant, settings, vae, threads)
                print(f"[study] training {variant}: python {' '.join(command[1:])}", flush=True)
                run_dir = out / "runs" / variant
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "train.log", "a") as stream:
                    running[variant] = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
            time.sleep(0.5)
            for variant, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[variant]
                log = out / "runs" / variant / "train.log"
                if process.returncode != 0 or (done := _finished_run(log.parent, settings)) is None:
                    tail = "\n".join(log.read_text().splitlines()[-25:])
                    raise RuntimeError(f"training {variant} failed (exit {process.returncode}); end of {log}:\n{tail}")
                runs[variant] = done
    finally:
        for process in running.values():  # an error (or Ctrl-C) stops the others; resume=auto continues them
            process.terminate()
            process.wait()
    return {v: runs[v] for v in settings.variants}


def sample_condition(model: Any, condition: Condition, settings: StudySettings) -> tuple[np.ndarray, list[str]]:
    """uint8 samples [N, H, W, 3] for every prompt x seed under the condition, and their prompts."""
    prompts = [p for p in PROMPTS for _ in range(settings.seeds_per_prompt)]
    seeds = [settings.seed + 1000 * i + j for i in range(len(PROMPTS)) for j in range(settings.seeds_per_prompt)]
    size = settings.resolution
    latents = generate_latents(
        model.model,
        prompts,
        size,
        size,
        negative_prompts=[""] * len(prompts),
        zero_uncond_text=False,
        sampler=DPMPP2MSampler(num_steps=settings.sampler_steps),
        denoiser=model.denoiser,
        guidance_scale=settings.guidance_scale,
        seed=seeds,
        original_size=condition.original_size,
        crop_coords_top_left=condition.crop,
        target_size=(size, size),
    )
    return latents_to_uint8(model.model, latents).numpy(), prompts


def evaluate(
    out: Path, settings: StudySettings, runs: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Sample and score every condition: (scores, samples by label); the samples are also kept as
    out/samples/<label>.npz (for --report-only)."""
    results, loaded, samples = [], {}, {}
    sample_dir = out / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for condition in conditions(settings):
        if condition.variant not in loaded:
            loaded[condition.variant] = load_model(runs[condition.variant]["run_dir"])  # its newest checkpoint, EMA
        started = time.time()
        images, prompts = sample_condition(loaded[condition.variant], condition, settings)
        scores = score_samples(list(images), prompts)
        name = condition.label.replace(" ", "_").replace("=", "").replace(",", "-")
        np.savez_compressed(sample_dir / f"{name}.npz", images=images, prompts=np.asarray(prompts))
        samples[condition.label] = images
        results.append(
            {
                **asdict(condition),
                "label": condition.label,
                "samples_file": f"samples/{name}.npz",
                "seconds": round(time.time() - started, 1),
                **scores,
            }
        )
        print(
            f"[study] {condition.label}: border cut {scores['border_cut_fraction']:.2f}, sharpness "
            f"{scores['mean_sharpness'] or float('nan'):.3f}, colour {scores['colour_accuracy']:.2f}",
            flush=True,
        )
    return results, samples


def calibrate(out: Path, settings: StudySettings, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The data reference (crops and their VAE round trip) and each variant's conditioning use, on training
    crops drawn through the study's loader with another data seed than training's."""
    cfg = compose_run_config(
        [
            "experiment=conditioning_study",
            *common_overrides(out, settings),
            "data.batch_size=64",
            f"data.seed={settings.seed + 1}",
        ]
    )
    loader = instantiate(cfg.data)(rank=0, world_size=1)
    try:
        batches = training_crops(loader, settings.calibration_images)
    finally:
        loader.close()
    use_batches, kept = [], 0
    for batch in batches:
        if kept >= settings.use_images:
            break
        batch = {k: v[: settings.use_images - kept] for k, v in batch.items()}
        use_batches.append(batch)
        kept += len(batch["jpg"])
    models = {v: load_model(r["run_dir"]) for v, r in runs.items()}
    reference = data_reference(next(iter(models.values())).model, batches, settings.sizes)
    use = {v: conditioning_use(m, use_batches, settings.use_sigmas, settings.seed) for v, m in models.items()}
    return {"data": reference, "conditioning_use": use, "use_images": kept}


def _earlier_timings(out: Path) -> dict[str, float]:
    """Step times an earlier run in `out` recorded (results.json), for the steps this run reuses."""
    path = out / "results.json"
    return json.loads(path.read_text()).get("timings_seconds", {}) if path.is_file() else {}


def run_study(
    out: str | Path, settings: StudySettings, command: str = "python -m sgm.eval.conditioning_study"
) -> dict[str, Any]:
    """Run every step (skipping finished ones) and write the report; returns results.json's content."""
    out = Path(out).absolute()
    torch.set_num_threads(settings.threads)
    earlier = _earlier_timings(out)
    timings: dict[str, float] = {}
    lap_started = time.time()

    def lap(step: str) -> None:
        nonlocal lap_started
        timings[step], lap_started = round(time.time() - lap_started, 1), time.time()

    reused = [] if build_data(out, settings) else ["data"]
    lap("data")
    vae = train_study_vae(out, settings)
    reused += ["vae"] if vae["reused"] else []
    lap("vae")
    if all(_finished_run(out / "runs" / v, settings) for v in settings.variants):
        reused.append("train_variants")
    runs = train_variants(out, settings, vae)
    lap("train_variants")
    results, samples = evaluate(out, settings, runs)
    lap("sampling_and_scoring")
    calibration = calibrate(out, settings, runs)
    lap("calibration")
    # a reused step counts with the time it took when it ran (the VAE's record; an earlier results.json here)
    recorded = {**earlier, "vae": vae["seconds"]}
    timings.update({step: recorded.get(step) or timings[step] for step in reused})
    record = {
        "command": command,
        "settings": asdict(settings),
        "vae": {k: vae[k] for k in ("path", "scale_factor", "steps", "curve", "seconds")},
        "runs": runs,
        "prompts": list(PROMPTS),
        "conditions": [{k: v for k, v in r.items() if k != "samples"} for r in results],
        "per_sample": {r["label"]: r["samples"] for r in results},
        "calibration": calibration,
        "timings_seconds": timings,
        "reused_steps": reused,
    }
    write_report(out, record, samples)
    return record


def rewrite_report(out: str | Path) -> dict[str, Any]:
    """Write report.md, samples.png and results.json again from a finished study's results and samples."""
    out = Path(out).absolute()
    text = (out / "results.json").read_text()
    written_in = str(Path(json.loads(text)["vae"]["path"]).parents[1])  # the study folder when it ran (out/vae/...)
    if written_in != str(out):  # the folder was moved or copied: its recorded paths follow it
        text = text.replace(json.dumps(written_in)[1:-1], json.dumps(str(out))[1:-1])
    record = json.loads(text)
    record.pop("verdicts", None)
    vae_path = Path(record["vae"]["path"])
    vae_record = json.loads(vae_path.with_name(f"{vae_path.stem}_training.json").read_text())
    record["vae"].setdefault("seconds", vae_record["seconds"])  # results written before it was recorded
    images = {c["label"]: np.load(out / c["samples_file"])["images"] for c in record["conditions"]}
    write_report(out, record, images)
    return record


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, StudySettings, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/conditioning_study"))
    parser.add_argument("--quick", action="store_true", help="a few steps of everything: checks the pipeline")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report of a finished study in --out")
    numbers = (
        "train_steps",
        "vae_steps",
        "seeds_per_prompt",
        "sampler_steps",
        "num_samples",
        "seed",
        "threads",
        "parallel_trainings",
    )
    for name in numbers:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=None)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else StudySettings()
    changes = {n: getattr(args, n) for n in numbers if getattr(args, n) is not None}
    if args.variants:
        changes["variants"] = tuple(args.variants)
    return args.out, replace(settings, **changes), args.report_only


def main(argv: Sequence[str] | None = None) -> int:
    out, settings, report_only = parse_args(argv)
    if report_only:
        rewrite_report(out)
        print(f"[study] report: {Path(out) / 'report.md'}")
        return 0
    arguments = list(sys.argv[1:] if argv is None else argv)
    record = run_study(out, settings, " ".join(["python -m sgm.eval.conditioning_study", *arguments]))
    print(f"[study] report: {Path(out) / 'report.md'} (took {sum(record['timings_seconds'].values()) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

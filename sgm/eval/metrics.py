"""FID, KID and CLIP score of a model's samples: the Python API (CLI, training callback, stage runner) and the CLI.

    python -m sgm.eval.metrics SOURCE --prompts FILE|SHARDS [--reference SHARDS|FOLDER --inception FILE] \\
        [--clip-model ViT-L-14 --clip-weights FILE] [--num-samples N --seed 0 --height 1024 --width 1024 \\
        --steps 30 --guidance 5] [--out DIR]

SOURCE is anything `sgm.checkpoint.model_source.load_model` reads (a run directory, a training checkpoint, an
official .safetensors; EMA weights unless --raw). Image i (i < num_samples) is prompt i mod P (P prompts, in
order) sampled with the project's sampler (DPM++ 2M, micro-conditioning at the output size, guidance as given)
from noise seed `seed + i`: the same image `python -m sgm.sample --prompt <that prompt> --seed <seed + i>` makes,
whatever the batch size or number of ranks. FID/KID compare the samples' Inception features with the reference
set's (cached by fingerprint, sgm.eval.reference); the CLIP score is the mean over images of 100 x max(cos, 0)
between each image and its prompt (sgm.eval.clip_score). Writes metrics.json and metrics.md to --out (default
<run_dir>/eval for a run directory, else outputs/eval/<source name>). Extractor weights are local files only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sgm.checkpoint.io import atomic_write
from sgm.diffusion.samplers import DPMPP2MSampler

if TYPE_CHECKING:
    from sgm.eval.fid import FeatureStats
    from sgm.eval.inception import InceptionFeatures

SAMPLER = "dpmpp2m"
METRIC_NAMES = ("fid", "kid_mean", "kid_std", "clip_score")


@dataclass
class EvalSettings:
    """How the evaluated images are made and how much reference data is read."""

    num_samples: int | None = None  # images; None: one per prompt
    seed: int = 0  # image i starts from noise seed seed + i
    height: int = 1024
    width: int = 1024
    num_steps: int = 30
    guidance_scale: float = 5.0
    batch_size: int = 4
    max_reference_images: int | None = None  # None: the whole reference set

    def check(self) -> None:
        """ValueError naming the setting when one is out of range."""
        for name in ("num_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_samples is not None and self.num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 (FID needs a covariance), got {self.num_samples}")
        if self.height < 8 or self.width < 8 or self.height % 8 or self.width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {self.height}x{self.width}")


@dataclass(frozen=True)
class Job:
    """One evaluated image: its index, prompt and noise seed."""

    index: int
    prompt: str
    seed: int


def eval_jobs(prompts: Sequence[str], settings: EvalSettings) -> list[Job]:
    """Every image of an evaluation in order: image i is prompt i mod P from noise seed settings.seed + i."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    count = _count(prompts, settings)
    return [Job(i, prompts[i % len(prompts)], settings.seed + i) for i in range(count)]


def rank_share(count: int, rank: int, world_size: int) -> range:
    """The job indices rank `rank` samples: i with i mod world_size == rank."""
    return range(rank, count, world_size)


def sample_images(
    model: Any,
    prompts: Sequence[str],
    settings: EvalSettings,
    rank: int = 0,
    world_size: int = 1,
    denoiser: Any = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, list[str]]:
    """This rank's share of the evaluation's images (uint8 [n, 3, H, W], CPU) and their prompts, in job order.

    `model` is an SDXL model where it is to run; `progress(n)` is called after each batch with the images done."""
    from sgm.inference import generate_latents, latents_to_uint8

    every = eval_jobs(prompts, settings)
    jobs = [every[i] for i in rank_share(len(every), rank, world_size)]
    images: list[Tensor] = []
    for start in range(0, len(jobs), settings.batch_size):
        batch = jobs[start : start + settings.batch_size]
        latents = generate_latents(
            model,
            [job.prompt for job in batch],
            settings.height,
            settings.width,
            sampler=DPMPP2MSampler(num_steps=settings.num_steps),
            denoiser=denoiser,
            guidance_scale=settings.guidance_scale,
            seed=[job.seed for job in batch],
        )
        images.append(latents_to_uint8(model, latents).permute(0, 3, 1, 2).contiguous())
        if progress is not None:
            progress(start + len(batch))
    height, width = settings.height, settings.width
    pixels = torch.cat(images) if images else torch.zeros(0, 3, height, width, dtype=torch.uint8)
    return pixels, [job.prompt for job in jobs]


def _count(prompts: Sequence[str], settings: EvalSettings) -> int:
    return len(prompts) if settings.num_samples is None else settings.num_samples


def image_features(images: Tensor, inception: InceptionFeatures) -> Tensor:
    """Inception pool features (float64 [n, 2048], CPU) of uint8 images (the extractor moves them, chunk by chunk,
    to its device)."""
    return inception(images).cpu()


def metrics_from_features(
    features: Tensor | None,
    clip_scores: Tensor | None,
    reference_features: Tensor | None,
    reference_stats: FeatureStats | None = None,
) -> dict[str, float | int]:
    """fid, kid_mean, kid_std (features and reference given), clip_score (scores given), num_samples.
    `reference_stats`: the reference features' statistics when the caller keeps them (computed here otherwise)."""
    from sgm.eval.fid import FeatureStats, frechet_distance, kernel_inception_distance

    count = len(features) if features is not None else len(clip_scores) if clip_scores is not None else 0
    metrics: dict[str, float | int] = {}
    if features is not None and reference_features is not None:
        reference = reference_stats if reference_stats is not None else FeatureStats.from_features(reference_features)
        metrics["fid"] = float(frechet_distance(FeatureStats.from_features(features), reference))
        kid_mean, kid_std = kernel_inception_distance(features, reference_features)
        metrics["kid_mean"], metrics["kid_std"] = float(kid_mean), float(kid_std)
    if clip_scores is not None:
        metrics["clip_score"] = float(clip_scores.double().mean())
    metrics["num_samples"] = int(count)
    return metrics


def compute_metrics(
    images: Tensor,
    prompts: Sequence[str],
    reference_features: Tensor | None,
    inception: torch.nn.Module | None,
    clip: Any | None,
) -> dict[str, float | int]:
    """The metrics of uint8 images [n, 3, H, W] and their prompts; each only where its extractor (and for
    FID/KID the reference features) is given."""
    use_inception = inception is not None and reference_features is not None
    features = image_features(images, inception) if use_inception else None
    scores = clip.score(images, list(prompts)) if clip is not None else None
    return metrics_from_features(features, scores, reference_features if use_inception else None)


# -- prompt sets --------------------------------------------------------------------------------------------
def read_prompts(source: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or the captions (`txt`) of image shards
    (shards in order, each shard's samples in key order), at most `limit`. ValueError when there are none."""
    path = Path(source)
    if path.is_file() and path.suffix != ".tar":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {path} holds no prompt (one prompt per line)")
        return prompts[:limit] if limit is not None else prompts
    return _shard_captions(str(source), limit)


def _shard_captions(source: str, limit: int | None) -> list[str]:
    from sgm.data.shard_list import expand_shards, iter_shard

    def fail(kind: str, detail: str) -> None:
        raise ValueError(f"prompt shards: {kind}: {detail}")

    try:
        urls = expand_shards(source)
    except ValueError as error:
        raise ValueError(f"prompts {source}: not a prompt file and not image shards: {error}") from None
    captions: list[str] = []
    for url in urls:
        samples = sorted(iter_shard(url, fail), key=lambda sample: sample["__key__"])
        captions += [sample["txt"].decode("utf-8").strip() for sample in samples if "txt" in sample]
        if limit is not None and len(captions) >= limit:
            return captions[:limit]
    if not captions:
        raise ValueError(f"prompt shards {source} hold no caption (.txt member)")
    return captions


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompt list (one per line): which prompts a result was computed on."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


# -- progress ------------------------------------------------------------------------------------------------
class ProgressLine:
    """`eval: 12/32 samples, 1.4 img/s, ETA 14 s` lines, at most every `interval` seconds and at the end."""

    def __init__(self, total: int, write: Callable[[str], None] = print, interval: float = 10.0) -> None:
        self.total, self.write, self.interval = total, write, interval
        self.started = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        self.write(f"eval: {done}/{self.total} samples, {rate:.2f} img/s, ETA {eta:.0f} s")


# -- reports -------------------------------------------------------------------------------------------------
def markdown_table(record: dict[str, Any]) -> str:
    """metrics.md: the metrics and the settings they were computed with."""
    metrics, settings = record["metrics"], record["settings"]
    lines = [f"# Metrics of {record['source']}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {_format(metrics[name])} |" for name in (*METRIC_NAMES, "num_samples") if name in metrics]
    lines += ["", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    lines += [f"| prompts | {record['prompts']['source']} ({record['prompts']['count']}) |"]
    if record.get("reference"):
        lines += [f"| reference | {record['reference']['source']} ({record['reference']['count']} images) |"]
    return "\n".join(lines) + "\n"


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def default_out_dir(source: str | os.PathLike) -> Path:
    """<run_dir>/eval for a run directory, else outputs/eval/<source name>."""
    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "eval"
    return Path("outputs/eval") / (path.stem or path.name)


def write_report(record: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """metrics.json and metrics.md in out_dir (written atomically); their paths."""
    paths = (out_dir / "metrics.json", out_dir / "metrics.md")
    for path, text in zip(paths, (json.dumps(record, indent=2) + "\n", markdown_table(record))):
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return paths


# -- the CLI -------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sgm.eval.metrics",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("source", help="run directory, training .ckpt or official-layout .safetensors")
    p.add_argument("--prompts", required=True, help="a text file (one prompt per line) or caption shards")
    p.add_argument("--reference", help="reference images for FID/KID: image shards (glob/brace range) or a folder")
    p.add_argument("--inception", help="weights-inception-2015-12-05-6726825d.pth (local file) for FID/KID")
    p.add_argument("--clip-model", help="open_clip model for the CLIP score: ViT-L-14, ViT-bigG-14 or a .json config")
    p.add_argument("--clip-weights", help="the CLIP model's local weights file")
    p.add_argument("--num-samples", type=int, help="images to sample (default: one per prompt)")
    p.add_argument("--seed", type=int, default=0, help="image i starts from noise seed SEED + i")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30, help="DPM++ 2M steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-reference", type=int, help="read at most this many reference images (default: all)")
    p.add_argument("--cache-dir", default="outputs/eval_cache", help="cached reference features")
    p.add_argument("--model", help="model config name or .yaml (default: the run's, or matched from the file)")
    p.add_argument("--pretrained", help="official file supplying the parts SOURCE lacks")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA ones (training checkpoints)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="UNet and text towers")
    p.add_argument("--out", type=Path, help="default: <run_dir>/eval for a run directory, else outputs/eval/<name>")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Option mistakes, before anything is loaded: one ValueError naming the option."""
    if (args.reference is None) != (args.inception is None):
        raise ValueError("FID/KID need both --reference (images) and --inception (weights file); give both or neither")
    if (args.clip_model is None) != (args.clip_weights is None):
        raise ValueError("the CLIP score needs both --clip-model and --clip-weights; give both or neither")
    if args.inception is None and args.clip_model is None:
        raise ValueError(
            "nothing to compute: give --reference and --inception (FID/KID) and/or --clip-model and "
            "--clip-weights (CLIP score)"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    settings = EvalSettings(
        num_samples=args.num_samples,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        batch_size=args.batch_size,
        max_reference_images=args.max_reference,
    )
    settings.check()
    return settings


def evaluate_source(args: argparse.Namespace) -> dict[str, Any]:
    """Load, sample, score: the metrics.json record."""
    from sgm.checkpoint.fingerprints import part_fingerprints
    from sgm.checkpoint.model_source import load_model
    from sgm.inference.cli import DTYPES, check_size, to_device

    check_args(args)
    settings = settings_from_args(args)
    limit = settings.num_samples
    prompts = read_prompts(args.prompts, limit)
    inception = clip = None
    if args.inception is not None:  # extractor files are checked before the (large) model is loaded
        from sgm.eval.inception import InceptionFeatures

        inception = InceptionFeatures(args.inception, option="--inception").eval().to(args.device)
    if args.clip_model is not None:
        from sgm.eval.clip_score import CLIPScorer

        clip = CLIPScorer(args.clip_model, args.clip_weights, device=args.device, what="CLIP weights (--clip-weights)")
    loaded = load_model(
        args.source, weights="raw" if args.raw else "ema", model_config=args.model, pretrained=args.pretrained
    )
    check_size(args, [loaded])
    reference = None
    started = time.perf_counter()
    if inception is not None:
        from sgm.eval.reference import reference_features

        reference = reference_features(
            args.reference,
            inception,
            size=min(settings.height, settings.width),
            max_images=settings.max_reference_images,
            cache_dir=args.cache_dir,
        )
        if len(reference) < 2:
            raise ValueError(f"--reference {args.reference}: {len(reference)} image(s); FID needs at least 2")
    reference_seconds = time.perf_counter() - started
    fingerprints = part_fingerprints(loaded.model)  # the weights evaluated (fp32, before any cast)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")
    to_device(loaded, args.device, DTYPES[dtype])
    total = _count(prompts, settings)
    print(
        f"[sgm] eval: {loaded.info['model']} from {loaded.info['checkpoint']} ({loaded.info['weights']} weights), "
        f"{total} samples at {settings.height}x{settings.width}",
        flush=True,
    )
    started = time.perf_counter()
    images, image_prompts = sample_images(
        loaded.model, prompts, settings, denoiser=loaded.denoiser, progress=ProgressLine(total, _print)
    )
    sampling_seconds = time.perf_counter() - started
    started = time.perf_counter()
    metrics = compute_metrics(images, image_prompts, reference, inception, clip)
    return {
        "source": str(args.source),
        "model": {**loaded.info, "fingerprints": fingerprints},
        "settings": {**asdict(settings), "sampler": SAMPLER, "dtype": dtype},
        "prompts": {"source": str(args.prompts), "count": len(prompts), "sha256": prompts_digest(prompts)},
        "reference": {"source": str(args.reference), "count": len(reference)} if reference is not None else None,
        "extractors": {
            "inception": str(Path(args.inception).absolute()) if args.inception else None,
            "inception_is_standard": inception.is_standard if inception is not None else None,
            "clip_model": args.clip_model,
            "clip_weights": str(Path(args.clip_weights).absolute()) if args.clip_weights else None,
        },
        "metrics": metrics,
        "seconds": {
            "reference_features": round(reference_seconds, 2),
            "sampling": round(sampling_seconds, 2),
            "features": round(time.perf_counter() - started, 2),
        },
    }


def _print(line: str) -> None:
    print(f"[sgm] {line}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = evaluate_source(args)
    except (ValueError, FileNotFoundError) as error:  # user-caused (bad source, missing weights, no prompts)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    out_dir = args.out if args.out is not None else default_out_dir(args.source)
    json_path, md_path = write_report(record, out_dir)
    shown = ", ".join(f"{k} {_format(v)}" for k, v in record["metrics"].items())
    print(f"[sgm] {shown}\n[sgm] wrote {json_path} and {md_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

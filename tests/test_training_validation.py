"""Held-out validation loss: the holdout split, fixed noise and timesteps, equal on 1 and 2 processes and across a
resume, on image and on cached-latent shards (real tiny runs on CPU; the 2-process run through `python train.py`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from training_utils import compose_train, fast_overrides, make_shards, train_cli

from sgm.data.latent_cache import CacheConfig, cache_latents
from sgm.data.latent_loader import LatentProcessor
from sgm.data.shard_list import iter_shard
from sgm.data.validation_set import held_out_processor, select_held_out, shard_keys
from sgm.models.build import build_model
from sgm.training.preflight import ConfigError
from sgm.training.run import build_module, run
from sgm.training.validation import (
    bucket_timesteps,
    fixed_noise,
    read_validation_log,
)
from sgm.training.validation_split import SPLIT_FILE, holdout_split, validation_plan, write_split

pytestmark = pytest.mark.usefixtures("one_thread")

# 5 samples over 2 ranks (3 + 2: the short rank pads), 3 timestep ranges in batches of 4 (ranges mixed in a batch)
SMALL = ["validation.max_samples=5", "validation.timestep_buckets=3", "validation.batch_size=4", "logger=csv"]
QUIET = ["samples.at_train_end=false", "module.ema_decay=0.9", "module.lr=2e-3", "module.warmup_steps=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 shards of 6 samples: holdout_fraction=0.25 keeps one (6 samples) out."""
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=24, num_emoji=2, samples_per_shard=6)


# validation off unless a test turns it on (fast_overrides runs experiment=tiny_cpu: no held-out shards)
PLAIN = ["validation.every_n_steps=0", "validation.at_start=false"]


def overrides(run_dir: Path, shards: Path, steps: int, extra: list[str] = ()) -> list[str]:
    given = {o.split("=", 1)[0] for o in extra}
    plain = [o for o in PLAIN if o.split("=", 1)[0] not in given]
    return [*fast_overrides(run_dir, shards, max_steps=steps, every=2), *QUIET, *SMALL, *plain, *extra]


def test_the_holdout_split_is_fixed_disjoint_complete_recorded_and_kept_on_resume(tmp_path, shards) -> None:
    names = [f"/data/a/shard-{i:05d}.tar" for i in range(10)]
    held, training = holdout_split(names, 0.25)
    assert len(held) == 3 and sorted(held + training) == names and not set(held) & set(training)
    shuffled = random.Random(0).sample(names, len(names))
    assert sorted(holdout_split(shuffled, 0.25)[0]) == held  # by name, not by list order
    moved = [n.replace("/data/a/", "/elsewhere/") for n in names]
    assert [Path(n).name for n in holdout_split(moved, 0.25)[0]] == [Path(n).name for n in held]
    assert len(holdout_split(names, 0.01)[0]) == 1 and len(holdout_split(names, 0.99)[1]) == 1

    tars = sorted(str(p) for p in shards.glob("*.tar"))
    assert shard_keys(tars[1]) == [raw["__key__"] for raw in iter_shard(tars[1], print)]  # from the headers alone
    chosen = [e.key for e in select_held_out(tars, 7)]
    assert (
        chosen == sorted(k for t in tars for k in shard_keys(t))[:7] == [e.key for e in select_held_out(tars[::-1], 7)]
    )

    run_dir = tmp_path / "run"
    cfg = compose_train(overrides(run_dir, shards, 2, ["validation.holdout_fraction=0.25"]))
    plan = validation_plan(cfg)
    assert len(plan.shards) == 1 and list(plan.train_data.shards) == plan.split["training"]
    assert sorted(plan.shards + plan.split["training"]) == sorted(str(p) for p in shards.glob("*.tar"))
    write_split(run_dir, plan.split)
    # a resume takes the split its run recorded, not a new one
    recorded = json.loads((run_dir / SPLIT_FILE).read_text())
    recorded["held_out"], recorded["training"] = (
        recorded["training"][:1],
        recorded["held_out"] + recorded["training"][1:],
    )
    (run_dir / SPLIT_FILE).write_text(json.dumps(recorded))
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    resumed = validation_plan(cfg, checkpoint)
    assert resumed.shards == recorded["held_out"] and list(resumed.train_data.shards) == recorded["training"]
    changed = compose_train(overrides(run_dir, shards, 2, ["validation.holdout_fraction=0.5"]))
    with pytest.raises(ConfigError, match=r"validation.holdout_fraction: .*holdout_fraction=0.25"):
        validation_plan(changed, checkpoint)


def test_a_holdout_needs_a_shard_list_of_two_or_more(tmp_path, shards) -> None:
    folder = compose_train(
        [
            *fast_overrides(tmp_path / "f", shards),
            "data=folder",
            f"data.folder={tmp_path}",
            "data.shards=null",  # the demo experiment's shards, which a folder run does not have
            "validation.holdout_fraction=0.1",
        ]
    )
    with pytest.raises(ConfigError, match=r"^validation.holdout_fraction: .*data=folder.*Fix: give validation.shards"):
        validation_plan(folder)
    one = make_shards(tmp_path / "one", num_samples=4, num_emoji=1, samples_per_shard=4)
    cfg = compose_train(overrides(tmp_path / "run", one, 2, ["validation.holdout_fraction=0.5"]))
    with pytest.raises(ConfigError, match=r"^validation.holdout_fraction: .*has 1 shard"):
        run(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_fixed_noise_and_timesteps_score_each_sample_alike_in_any_batch(tmp_path, shards) -> None:
    assert bucket_timesteps(0, 999, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert bucket_timesteps(0, 199, 2) == [50, 150]  # a refiner's truncated schedule
    module = build_module(compose_train(overrides(tmp_path / "run", shards, 2)))
    module.eval()
    loss = module.loss_fn
    # the training loss, its draws made by a generator, equals loss_at given the same draws
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {
        "txt": ["a", "b c", "d"],
        "original_size_as_tuple": torch.tensor([[64, 64], [80, 64], [64, 96]]),
        "crop_coords_top_left": torch.tensor([[0, 0], [8, 0], [0, 16]]),
        "target_size_as_tuple": torch.tensor([[64, 64]] * 3),
    }
    with torch.no_grad():
        cond = module.model.condition(batch)
        trained = loss(module.model.unet, latents, cond, generator=torch.Generator().manual_seed(7))
        draws = torch.Generator().manual_seed(7)
        sigmas, _ = loss.noise_level_sampler(3, draws)
        noise = loss.sample_noise(latents, draws)
        assert torch.equal(loss.loss_at(module.model.unet, latents, cond, sigmas, noise), trained)
        # per-sample noise is a function of (seed, key, range) only; the scores do not depend on the batch
        keys, ranges = ["k0", "k1", "k2"], [0, 2, 1]
        noise = torch.stack([fixed_noise(loss, (4, 8, 8), 0, k, b) for k, b in zip(keys, ranges)])
        assert torch.equal(noise[0], fixed_noise(loss, (4, 8, 8), 0, "k0", 0))
        assert not torch.equal(noise[0], fixed_noise(loss, (4, 8, 8), 0, "k0", 1))
        assert not torch.equal(noise[0], fixed_noise(loss, (4, 8, 8), 1, "k0", 0))
        sigmas = loss.noise_level_sampler.sigmas[torch.tensor([bucket_timesteps(0, 999, 3)[b] for b in ranges])]
        together = loss.loss_at(module.model.unet, latents, cond, sigmas, noise)
        order = [2, 0, 1]
        reordered = loss.loss_at(
            module.model.unet,
            latents[order],
            module.model.condition(
                {k: [v[i] for i in order] if isinstance(v, list) else v[order] for k, v in batch.items()}
            ),
            sigmas[order],
            noise[order],
        )
        for i in range(3):
            alone = module.model.condition({k: v[i : i + 1] for k, v in batch.items()})
            single = loss.loss_at(module.model.unet, latents[i : i + 1], alone, sigmas[i : i + 1], noise[i : i + 1])
            torch.testing.assert_close(single[0], together[i], rtol=1e-5, atol=0)
            torch.testing.assert_close(reordered[order.index(i)], together[i], rtol=1e-5, atol=0)


def test_validation_is_equal_on_one_and_two_processes_and_across_a_resume(tmp_path, shards) -> None:
    holdout = ["validation.holdout_fraction=0.25", "validation.every_n_steps=2"]
    straight = tmp_path / "straight"
    run(compose_train(overrides(straight, shards, 4, holdout)))
    # the same weights (step 2 of that run) scored by 2 processes: a resume that scores before its first step
    two = train_cli(
        [
            *overrides(tmp_path / "two", shards, 3, holdout),
            f"resume={straight / 'checkpoints' / 'step000002.ckpt'}",
            "resume_reshard=true",
            "validation.at_start=true",
            "strategy=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
        ],
        timeout=400,
        wait=False,
    )
    try:
        stopped = tmp_path / "stopped"
        run(compose_train(overrides(stopped, shards, 2, holdout)))
        with open(stopped / "validation.jsonl", "a") as log:  # a killed run's line past its checkpoint
            log.write(json.dumps({"step": 3, "weights": "raw", "loss": 0.0}) + "\n")
        run(compose_train(overrides(stopped, shards, 4, holdout)))
        output, _ = two.communicate(timeout=400)
    finally:
        two.kill()
    assert two.returncode == 0, output[-4000:]

    expected = read_validation_log(straight)
    assert [(r["step"], r["weights"]) for r in expected] == [(2, "raw"), (2, "ema"), (4, "raw"), (4, "ema")]
    assert all(r["samples"] == 5 and len(r["loss_by_bucket"]) == 3 == len(r["timesteps"]) for r in expected)
    assert expected[0]["loss"] != expected[1]["loss"] and expected[0]["loss"] != expected[2]["loss"]
    assert read_validation_log(stopped) == expected  # resumed: the same lines, the killed run's dropped
    assert json.loads((stopped / SPLIT_FILE).read_text()) == json.loads((straight / SPLIT_FILE).read_text())
    on_two = [r for r in read_validation_log(tmp_path / "two") if r["step"] == 2]
    assert [r["weights"] for r in on_two] == ["raw", "ema"]
    for one, other in zip(expected[:2], on_two):
        assert one["timesteps"] == other["timesteps"] and one["samples"] == other["samples"]
        torch.testing.assert_close(
            torch.tensor(other["loss_by_bucket"]), torch.tensor(one["loss_by_bucket"]), rtol=1e-6, atol=0
        )
    assert (tmp_path / "two" / SPLIT_FILE).read_text() == (straight / SPLIT_FILE).read_text()  # the recorded split
    metrics = (straight / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/loss_t0", "val/loss_t2", "val/ema_loss", "val/ema_loss_t1"} <= set(metrics)


def test_cached_latent_shards_validate_like_their_images(tmp_path, shards) -> None:
    held_out = str(sorted(shards.glob("*.tar"))[0])
    on_images = overrides(tmp_path / "images", shards, 1, ["validation.at_start=true", f"validation.shards={held_out}"])
    cfg = compose_train(on_images)
    torch.manual_seed(cfg.seed)  # the run's own VAE (build_module seeds the same way)
    model = build_model(cfg.model)
    model.freeze_frozen_parts()
    settings = CacheConfig(square_size=64, crop="center", latent_mode="mean", storage_dtype="float32")
    cache_latents(model, f"{shards}/*.tar", tmp_path / "latents", settings, batch_size=4, progress=False)
    run(cfg)
    cached = [
        *(o for o in overrides(tmp_path / "cached", shards, 1) if not o.startswith("data.shards=")),
        "data=cached_latents",
        f"data.shards={tmp_path / 'latents'}/*.tar",
        "data.text_embeddings=false",
        "data.num_workers=0",
        "data.batch_size=4",
        "validation.at_start=true",
        f"validation.shards={tmp_path / 'latents' / Path(held_out).name}",
    ]
    run(compose_train(cached))
    images, latents = (read_validation_log(tmp_path / name)[:2] for name in ("images", "cached"))
    image_reader = instantiate(cfg.data)(rank=0, world_size=1).config.sample_processor()
    assert isinstance(
        held_out_processor(image_reader, [str(tmp_path / "latents" / Path(held_out).name)]), LatentProcessor
    )
    for image, latent in zip(images, latents):
        assert image["step"] == latent["step"] == 0 and image["samples"] == latent["samples"] == 5
        torch.testing.assert_close(
            torch.tensor(latent["loss_by_bucket"]), torch.tensor(image["loss_by_bucket"]), rtol=1e-4, atol=0
        )

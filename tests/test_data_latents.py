"""Cached latents: the cache tool against the image path, restart and ranks, the latent loader.

Shards come from test_data_loader's generator (small images, json originals 3x the stored
size). The tiny model is seeded; its UNet is randomised so the loss depends on the conditioning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fresh_tiny_model, randomize_
from test_data_loader import make_dataset, sample_members, write_shard

from sgm.data.buckets import bucket_table
from sgm.data.latent_cache import (
    CacheConfig,
    cache_latents,
    output_name,
    rank_shards,
    read_empty_caption,
    shard_seed,
)
from sgm.data.latent_loader import LatentLoader, read_npy
from sgm.data.loader import BucketedLoader
from sgm.data.shard_list import iter_shard
from sgm.data.stream import SlotStream, StreamConfig
from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling
from sgm.diffusion.loss import DiffusionLoss
from sgm.diffusion.noise_levels import DiscreteTimestepSampler
from sgm.diffusion.weighting import EpsWeighting

NAMES = ["shard-0.tar", "shard-1.tar", "shard-2.tar"]
MEAN = {
    "base_resolution": 64,
    "crop": "center",
    "latent_mode": "mean",
    "storage_dtype": "float32",
    "text_embeddings": True,
    "seed": 1,
}
FAST = {"square_size": 32, "latent_mode": "mean", "seed": 2}


@pytest.fixture(scope="module")
def model():
    tiny = fresh_tiny_model()
    randomize_(tiny.unet, seed=3)
    return tiny


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("images")
    return root, make_dataset(root, [4, 4, 4])


def shards_of(root: Path) -> str:
    return str(root / "shard-*.tar")


@pytest.fixture(scope="module")
def mean_cache(model, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mean_cache")
    summary = cache_latents(model, shards_of(dataset[0]), out, CacheConfig(**MEAN), batch_size=3, progress=False)
    assert summary.written == NAMES and summary.samples == 12 and not summary.bad
    return out


@pytest.fixture(scope="module")
def fast_cache(model, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fast_cache")
    cache_latents(model, shards_of(dataset[0]), out, CacheConfig(**FAST), progress=False)
    return out


def by_key(batches) -> dict[str, dict]:
    """key -> that sample's row of every batch entry."""
    rows = {}
    for batch in batches:
        for i, key in enumerate(batch["__key__"]):
            rows[key] = {
                name: value[i] if not isinstance(value, dict) else {k: tuple(t[i] for t in v) for k, v in value.items()}
                for name, value in batch.items()
            }
    return rows


def image_rows(root: Path, **options) -> dict[str, dict]:
    loader = BucketedLoader(shards_of(root), batch_size=2, num_epochs=1, shuffle_buffer=0, **options)
    return by_key(loader)


def pixels(row: dict) -> torch.Tensor:
    return row["jpg"][None].float() / 127.5 - 1.0


def test_cached_latents_and_conditioning_equal_the_image_path(model, dataset, mean_cache) -> None:
    cached = by_key(LatentLoader(str(mean_cache / "*.tar"), batch_size=2, num_epochs=1, text_embeddings=True))
    images = image_rows(dataset[0], base_resolution=64, crop="center")
    assert sorted(cached) == sorted(images) == sorted(dataset[1])
    for key, row in cached.items():
        image = images[key]
        for name in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            assert torch.equal(row[name], image[name]), (key, name)
        height, width = row["target_size_as_tuple"].tolist()
        assert row["latents"].shape == (4, height // 8, width // 8)
        assert row["txt"] == image["txt"] == f"caption {key}"
        with torch.no_grad():
            want = model.encode_first_stage(pixels(image), sample=False)[0]
            text = {i: model.conditioner.embedder_outputs(i, [row["txt"]]) for i in (0, 1)}
        torch.testing.assert_close(row["latents"], want, rtol=1e-5, atol=1e-5)
        for index, outputs in text.items():
            for got, ref in zip(row["cached_embeddings"][index], outputs):
                torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-5)
    key = min(cached)  # decoding the cached latents gives the VAE's reconstruction of the crop
    with torch.no_grad():
        decoded = model.decode_first_stage(cached[key]["latents"][None])
        reconstruction = model.vae(pixels(images[key]))
    torch.testing.assert_close(decoded, reconstruction, rtol=1e-4, atol=1e-4)
    empty = read_empty_caption(mean_cache)
    torch.testing.assert_close(empty[1][1], model.conditioner.embedder_outputs(1, [""])[1][0])


def test_posterior_samples_are_seeded_and_crops_follow_the_image_stream(model, dataset, tmp_path) -> None:
    """Random crops and posterior samples, fp16: (latent / scale - mean) / std is N(0, 1) noise."""
    root, _ = dataset
    config = CacheConfig(base_resolution=64, seed=5)
    shard = str(root / "shard-1.tar")
    cache_latents(model, shard, tmp_path / "a", config, batch_size=2, progress=False)
    cache_latents(model, shard, tmp_path / "b", config, batch_size=2, progress=False)
    assert (tmp_path / "a/shard-1.tar").read_bytes() == (tmp_path / "b/shard-1.tar").read_bytes()
    stream = StreamConfig(
        shards=(shard,),
        buckets=tuple(bucket_table(64)),
        batch_size=1,
        shuffle_buffer=0,
        num_epochs=1,
        seed=shard_seed(5, "shard-1.tar"),
    )
    images = by_key(batch for batch, _ in SlotStream(stream, 0, 1) if batch is not None)
    noise = []
    for raw in iter_shard(str(tmp_path / "a/shard-1.tar"), lambda *_: None):
        latent, meta = read_npy(raw["latent.npy"]), json.loads(raw["json"])
        assert latent.dtype.name == "float16"
        image = images[meta["key"]]
        for name in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            assert meta[name] == image[name].tolist(), name
        with torch.no_grad():
            posterior = model.vae.encode(pixels(image))
        noise.append(
            (
                (torch.from_numpy(latent.astype("float32")) / model.scale_factor - posterior.mean[0]) / posterior.std[0]
            ).flatten()
        )
    noise = torch.cat(noise)
    assert len(images) == 4 and noise.numel() > 500
    assert abs(noise.mean().item()) < 0.15 and abs(noise.std().item() - 1.0) < 0.15


def test_restart_skips_completed_shards_and_settings_are_guarded(
    model, dataset, fast_cache, tmp_path, monkeypatch
) -> None:
    calls, encode = [], model.vae.encode

    def crash_on_second_shard(images):
        calls.append(1)
        if len(calls) == 2:  # square_size: one VAE call per 4-sample shard
            raise RuntimeError("simulated crash")
        return encode(images)

    out = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(model.vae, "encode", crash_on_second_shard)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cache_latents(model, shards_of(dataset[0]), out, CacheConfig(**FAST), progress=False)
    assert sorted(p.name for p in out.glob("*.tar*")) == ["shard-0.tar"]  # no partial shard, no .tmp left
    first = (out / "shard-0.tar").stat().st_mtime_ns
    summary = cache_latents(model, shards_of(dataset[0]), out, CacheConfig(**FAST), progress=False)
    assert summary.skipped_complete == ["shard-0.tar"] and summary.written == NAMES[1:] and summary.samples == 8
    assert (out / "shard-0.tar").stat().st_mtime_ns == first
    for name in NAMES:
        assert (out / name).read_bytes() == (fast_cache / name).read_bytes()
    with pytest.raises(ValueError, match="other settings .*crop: 'random' -> 'center'"):
        cache_latents(model, shards_of(dataset[0]), out, CacheConfig(**FAST, crop="center"), progress=False)


def test_output_names_and_rank_slices(tmp_path) -> None:
    assert output_name("pipe:aws s3 cp s3://bucket/laion/00001.tar -") == "00001.tar"
    assert output_name("/data/a/00002.tar.gz") == "00002.tar"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            (tmp_path / folder / f"{i:05d}.tar").write_bytes(b"")
    slices = [rank_shards(str(tmp_path / "a/*.tar"), rank, 2) for rank in (0, 1)]
    assert [name for part in slices for _, name in part] == ["00000.tar", "00002.tar", "00001.tar"]
    with pytest.raises(ValueError, match="share output names"):
        rank_shards([str(tmp_path / "a/*.tar"), str(tmp_path / "b/*.tar")], 0, 1)


def test_two_ranks_write_disjoint_complete_sets(model, dataset, fast_cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    one = cache_latents(model, shards_of(dataset[0]), tmp_path, CacheConfig(**FAST), progress=False)
    zero = cache_latents(model, shards_of(dataset[0]), tmp_path, CacheConfig(**FAST), rank=0, progress=False)
    assert zero.written and one.written and not set(zero.written) & set(one.written)
    assert sorted(zero.written + one.written) == sorted(p.name for p in tmp_path.glob("*.tar")) == NAMES
    assert all((tmp_path / n).read_bytes() == (fast_cache / n).read_bytes() for n in NAMES)


def test_bfloat16_vae_caches_close_latents_and_the_dtype_is_checked(model, dataset, fast_cache, tmp_path) -> None:
    import copy

    shard = str(dataset[0] / "shard-0.tar")
    with pytest.raises(ValueError, match="vae_dtype=bfloat16"):
        cache_latents(model, shard, tmp_path / "x", CacheConfig(**FAST, vae_dtype="bfloat16"), progress=False)
    bf16 = copy.deepcopy(model)
    bf16.vae.to(torch.bfloat16)
    cache_latents(bf16, shard, tmp_path / "bf16", CacheConfig(**FAST, vae_dtype="bfloat16"), progress=False)
    read = [
        {
            raw["__key__"]: torch.from_numpy(read_npy(raw["latent.npy"]).astype("float32"))
            for raw in iter_shard(str(root / "shard-0.tar"), lambda *_: None)
        }
        for root in (tmp_path / "bf16", fast_cache)
    ]
    assert sorted(read[0]) == sorted(read[1])
    for key, latent in read[0].items():
        torch.testing.assert_close(latent, read[1][key], rtol=0.05, atol=0.05 * read[1][key].abs().max().item())


def bad_latent_shard(root: Path, good: Path) -> str:
    """A cached shard with one good sample and one of each defect."""
    sample = next(iter_shard(str(good / "shard-0.tar"), lambda *_: None))
    ok = {ext: sample[ext] for ext in ("latent.npy", "json", "text.safetensors")}
    members = [(f"fine.{ext}", data) for ext, data in ok.items()]
    members += [("nolatent.json", ok["json"]), ("nolatent.text.safetensors", ok["text.safetensors"])]
    members += [("badlatent.latent.npy", b"\x93NUMPY garbage"), ("badlatent.json", ok["json"])]
    members += [("nojson.latent.npy", ok["latent.npy"]), ("nojson.text.safetensors", ok["text.safetensors"])]
    members += [("nocrop.latent.npy", ok["latent.npy"]), ("nocrop.json", b'{"caption": "x"}')]
    members += [("notext.latent.npy", ok["latent.npy"]), ("notext.json", ok["json"])]
    members += [
        ("badtext.latent.npy", ok["latent.npy"]),
        ("badtext.json", ok["json"]),
        ("badtext.text.safetensors", b"not safetensors"),
    ]
    return write_shard(root / "bad.tar", members)


def test_latent_loader_groups_by_shape_resumes_exactly_and_counts_bad(mean_cache, tmp_path) -> None:
    shards = sorted(str(p) for p in mean_cache.glob("*.tar")) + [bad_latent_shard(tmp_path, mean_cache)]
    options = {
        "batch_size": 2,
        "shuffle_buffer": 4,
        "seed": 7,
        "text_embeddings": True,
        "max_bad_fraction": 1.0,
        "min_seen_for_check": 0,
    }
    finite = LatentLoader(shards, num_epochs=1, **options)
    keys = []
    for batch in finite:
        keys += batch["__key__"]
        height, width = batch["target_size_as_tuple"][0].tolist()
        assert (batch["target_size_as_tuple"] == batch["target_size_as_tuple"][0]).all()
        assert batch["latents"].dtype == torch.float32 and batch["latents"].shape[1:] == (4, height // 8, width // 8)
        size = len(batch["__key__"])
        assert [t.shape for t in batch["cached_embeddings"][1]] == [(size, 77, 64), (size, 64)]
    assert len(keys) == len(set(keys)) == 13 and "fine" in keys
    assert finite.bad_counts() == {
        "missing_latent": 1,
        "bad_latent": 1,
        "bad_conditioning": 2,
        "missing_text_embeddings": 1,
        "bad_text_embeddings": 1,
    }

    def take(loader, count):
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    reference = take(LatentLoader(shards, **options), 12)  # endless: crosses epochs
    first = LatentLoader(shards, **options)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    assert any(snap["buckets"] for snap in state["ranks"]["0"]["snapshots"].values())  # shape keys held
    resumed = LatentLoader(shards, **options)
    resumed.load_state_dict(state)
    for got, want in zip(take(resumed, 7), reference[5:]):
        assert got["__key__"] == want["__key__"] and torch.equal(got["latents"], want["latents"])
        assert torch.equal(got["cached_embeddings"][0][0], want["cached_embeddings"][0][0])


def test_training_loss_from_cache_equals_loss_from_images(model, dataset, mean_cache) -> None:
    cached = by_key(LatentLoader(str(mean_cache / "*.tar"), batch_size=3, num_epochs=1, text_embeddings=True))
    images = image_rows(dataset[0], base_resolution=64, crop="center")
    loss_fn = DiffusionLoss(DiscreteDenoiser(EpsScaling()), DiscreteTimestepSampler(), EpsWeighting())
    sizes = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
    for seed, key in enumerate(sorted(cached)[:4]):
        row, image = cached[key], images[key]
        with torch.no_grad():
            live_cond = model.conditioner({"txt": [image["txt"]], **{n: image[n][None] for n in sizes}})
            live = loss_fn(
                model.unet,
                model.encode_first_stage(pixels(image), sample=False),
                live_cond,
                generator=torch.Generator().manual_seed(seed),
            )
            embeddings = {i: tuple(t[None] for t in parts) for i, parts in row["cached_embeddings"].items()}
            cond = model.conditioner({"cached_embeddings": embeddings, **{n: row[n][None] for n in sizes}})
            loss = loss_fn(model.unet, row["latents"][None], cond, generator=torch.Generator().manual_seed(seed))
        assert loss.item() > 0
        torch.testing.assert_close(loss, live, rtol=1e-4, atol=1e-6)


def test_aesthetic_score_passes_through_the_cache(model, tmp_path) -> None:
    scored = sample_members("scored", 48, 48, seed=1)
    scored[1] = ("scored.json", json.dumps({"aesthetic_score": 6.5}).encode())
    shard = write_shard(tmp_path / "aes.tar", scored + sample_members("plain", 48, 48, seed=2))
    cache_latents(model, shard, tmp_path / "out", CacheConfig(**FAST), progress=False)
    with_default = next(
        iter(LatentLoader(str(tmp_path / "out/aes.tar"), batch_size=2, num_epochs=1, default_aesthetic_score=5.0))
    )
    scores = dict(zip(with_default["__key__"], with_default["aesthetic_score"].tolist()))
    assert scores == {"scored": 6.5, "plain": 5.0}
    without = next(iter(LatentLoader(str(tmp_path / "out/aes.tar"), batch_size=2, num_epochs=1)))
    assert "aesthetic_score" not in without


def test_cli_loads_the_checkpoint_parts_and_matches_the_library(model, dataset, fast_cache, tmp_path) -> None:
    import importlib.util

    from sgm.checkpoint.io import save_checkpoint

    checkpoint = save_checkpoint(model, tmp_path / "vae.safetensors", parts=["vae"])
    script = Path(__file__).parents[1] / "data" / "cache_latents.py"
    spec = importlib.util.spec_from_file_location("cache_latents_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [
        shards_of(dataset[0]),
        "--out",
        str(tmp_path / "out"),
        "--model",
        "tiny",
        "--checkpoint",
        str(checkpoint),
        "--square-size",
        "32",
        "--latent-mode",
        "mean",
        "--seed",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    assert all((tmp_path / "out" / n).read_bytes() == (fast_cache / n).read_bytes() for n in NAMES)
    assert json.loads((tmp_path / "out/_cache_summary_rank0.json").read_text())["written"] == NAMES
    with pytest.raises(SystemExit):  # argparse refuses a float16 VAE
        cli.main(argv + ["--vae-dtype", "float16"])

"""`data=folder data.cache_latents=true`: the folder's build encoded once by the run's VAE (sgm/data/folder_latents.py).

Two official files of the tiny model (seeds 5 and 6: different VAEs) stand in for `pretrained`; the folder
holds four small images of the demo stage's 128 px table, two of them smaller than their bucket (trained at a
smaller bucket with bucket_no_upscale). Nothing is mocked.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fresh_tiny_model
from omegaconf import OmegaConf
from PIL import Image
from training_utils import compose_train

from sgm.checkpoint.io import save_checkpoint
from sgm.checkpoint.pretrained import load_pretrained
from sgm.data.folder import build_folder_shards, folder_loader
from sgm.data.folder_latents import LATENTS_MARKER, LatentRequest, encoding_device
from sgm.data.latent_cache import encode_batch, output_name
from sgm.data.latent_loader import LatentLoader
from sgm.models.build import build_model, load_model_config

BASE = 128
# relative path -> ((h, w), format, caption or None)
IMAGES = {
    "a.png": ((100, 140), "PNG", "a wide thing"),
    "b.png": ((150, 120), "PNG", None),
    "sub/c.jpg": ((90, 90), "JPEG", "a small square"),
    "d.webp": ((200, 130), "WEBP", "a tall one"),
}
LOG = "sgm.data.folder_latents"


def make_folder(root: Path) -> Path:
    for seed, (rel, ((height, width), fmt, caption)) in enumerate(IMAGES.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        path.write_bytes(buffer.getvalue())
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """Two official tiny files whose VAEs differ."""
    root = tmp_path_factory.mktemp("official")
    return (
        save_checkpoint(fresh_tiny_model(seed=5), root / "five.safetensors"),
        save_checkpoint(fresh_tiny_model(seed=6), root / "six.safetensors"),
    )


def run_refs(pretrained: Path, **changes) -> dict:
    """What configs/data/folder.yaml's `run:` passes by reference, for the tiny model."""
    model = OmegaConf.to_container(load_model_config("tiny"), resolve=True)
    return {"model": model, "pretrained": str(pretrained), "pretrained_parts": None, "trainable": None, **changes}


def cached_loader(folder: Path, cache: Path, pretrained: Path, **options) -> LatentLoader:
    settings = {"base_resolution": BASE, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 0, **options}
    loader = folder_loader(
        str(folder), folder_cache=str(cache), cache_latents=True, run=run_refs(pretrained), **settings
    )
    assert isinstance(loader, LatentLoader)
    return loader


def latent_caches(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if "-latents-" in p.name and not p.name.startswith("."))


def by_key(loader, count: int) -> dict[str, dict]:
    """key -> that sample's row of the batches (one pass of a batch-size-1 loader)."""
    rows: dict[str, dict] = {}
    for batch, _ in zip(loader, range(3 * count)):
        for b, key in enumerate(batch["__key__"]):
            rows[key] = {name: value[b] for name, value in batch.items() if isinstance(value, torch.Tensor)}
        if len(rows) == count:
            break
    return rows


def test_encodes_once_then_reuses_and_a_changed_folder_or_vae_encodes_anew(files, tmp_path, caplog):
    five, six = files
    folder, cache = make_folder(tmp_path / "images"), tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger=LOG):
        first = cached_loader(folder, cache, five)
    assert f"encoded {len(IMAGES)} images into" in caplog.text
    (made,) = latent_caches(cache)
    stamps = {p: p.stat().st_mtime_ns for p in made.rglob("*")}
    assert list(first.config.shards) == sorted(str(p) for p in made.glob("*.tar"))
    batch = next(iter(first))
    assert batch["latents"].shape[:2] == (2, 4) and "jpg" not in batch and "cached_embeddings" not in batch

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOG):
        again = cached_loader(folder, cache, five, repeats=3)
    assert "encoded" not in caplog.text and f"reusing {len(IMAGES)} latents in {made}" in caplog.text
    assert latent_caches(cache) == [made] and {p: p.stat().st_mtime_ns for p in made.rglob("*")} == stamps
    assert list(again.config.shards) == list(first.config.shards) * 3  # repeats: the cached list, 3 times

    cached_loader(folder, cache, six)  # another VAE: the same folder build, new latents
    assert len(latent_caches(cache)) == 2 and latent_caches(cache)[1 - latent_caches(cache).index(made)] != made
    with_text = folder_loader(
        str(folder), folder_cache=str(cache), cache_latents=True, cache_text_embeddings=True, run=run_refs(five),
        base_resolution=BASE, batch_size=2, num_workers=0,
    )  # fmt: skip
    assert set(next(iter(with_text))["cached_embeddings"]) == {0, 1} and set(with_text.empty_caption_outputs()) == {
        0,
        1,
    }
    assert len(latent_caches(cache)) == 3  # text embeddings are cached apart
    (folder / "a.txt").write_text("a wide thing, changed")
    cached_loader(folder, cache, five)  # a changed caption: a new folder build, new latents
    assert len(latent_caches(cache)) == 4
    builds = [p for p in cache.iterdir() if not p.name.startswith(".") and "-latents-" not in p.name]
    assert len(builds) == 2 and all((p / LATENTS_MARKER).is_file() for p in latent_caches(cache))


def test_cached_latents_are_the_run_vae_encoding_of_the_image_paths_crops(files, tmp_path):
    """Same buckets (no-upscale ones included), crops and micro-conditioning as the image loader, and latents
    equal to the run's VAE (built and loaded as training does) encoding those crops."""
    five, _ = files
    folder, cache = make_folder(tmp_path / "images"), tmp_path / "cache"
    options = {"batch_size": 1, "crop": "center"}
    cached = by_key(cached_loader(folder, cache, five, **options), len(IMAGES))
    images = folder_loader(
        str(folder), folder_cache=str(cache), base_resolution=BASE, num_workers=0, shuffle_buffer=0, **options
    )
    (shard,) = build_folder_shards(folder, cache=cache, verbose=False).shards
    torch.manual_seed(0)
    model = build_model("tiny")
    load_pretrained(model, five)  # the run's VAE, as build_module loads it
    model.vae.to(encoding_device())  # where the cache encoded (a GPU where there is one)
    request = LatentRequest.checked(
        run_refs(five),
        text_embeddings=False,
        cache_latents=True,
        from_folder=True,
        base_resolution=BASE,
        square_size=None,
        bucket_no_upscale=True,
        options={"crop": "center"},
    )  # the settings the cache was made with
    seen = set()
    for batch, _ in zip(images, range(3 * len(IMAGES))):
        key = batch["__key__"][0]
        seen.add(key)
        expected, _ = encode_batch(model, batch, request.settings, output_name(shard))
        row = cached[key]
        for name in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            assert row[name].tolist() == batch[name][0].tolist(), (key, name)
        h, w = batch["target_size_as_tuple"][0].tolist()
        assert row["latents"].shape == (4, h // 8, w // 8) == expected.shape[1:]
        torch.testing.assert_close(row["latents"].float(), expected[0].half().float(), atol=2e-3, rtol=2e-3)
        if len(seen) == len(IMAGES):
            break
    assert seen == set(cached)
    sizes = {tuple(row["target_size_as_tuple"].tolist()) for row in cached.values()}
    assert {(96, 128), (64, 64)} <= sizes  # the two images smaller than their bucket: not upscaled


def train_overrides(tmp_path: Path, folder: Path, pretrained: Path | None, *extra: str) -> list[str]:
    return [
        "~experiment",
        "name=folder_latents",
        f"run_dir={tmp_path / 'run'}",
        "model=tiny",
        "data=folder",
        f"data.folder={folder}",
        f"data.folder_cache={tmp_path / 'cache'}",
        "data.cache_latents=true",
        *([f"pretrained={pretrained}"] if pretrained else []),
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        "trainer.max_steps=3",
        "checkpoint.every_n_train_steps=3",
        "samples.num_steps=2",
        "samples.seeds=[0]",
        "samples.height=64",
        "samples.width=64",
        "samples.at_train_end=false",
        "threads=1",
        *extra,
    ]


class BatchKeys:
    """The batch keys seen and the VAE encoder's calls during training steps (a Lightning callback)."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        class Watch(pl.Callback):
            def on_fit_start(inner, trainer, pl_module) -> None:
                pl_module.model.vae.encoder.register_forward_hook(lambda *_: self.encodes.append(1))

            def on_train_batch_start(inner, trainer, pl_module, batch, batch_idx) -> None:
                self.keys |= set(batch)

        self.keys: set[str] = set()
        self.encodes: list[int] = []
        self.callback = Watch()


def test_a_run_trains_from_the_folder_latents(files, tmp_path):
    from sgm.training.run import run

    five, _ = files
    folder = make_folder(tmp_path / "images")
    watch = BatchKeys()
    outputs = run(compose_train(train_overrides(tmp_path, folder, five)), extra_callbacks=[watch.callback])
    assert outputs["global_step"] == "3"
    assert "latents" in watch.keys and "jpg" not in watch.keys and not watch.encodes  # the VAE never encoded
    assert len(latent_caches(tmp_path / "cache")) == 1  # encoded once: the preflight built it, the run reused it


@pytest.mark.parametrize(
    ("extra", "with_file", "match"),
    [
        (
            ["data.cache_text_embeddings=true", "+module.trainable.text_encoder_0={mode: lora, lora: {rank: 4}}"],
            True,
            r"^data: data\.cache_text_embeddings=true .*module\.trainable trains text_encoder_0.*"
            r"Fix: data\.cache_text_embeddings=false",
        ),
        ([], False, r"^data: data\.cache_latents=true encodes with the VAE .* Fix: pretrained=/path"),
        (["pretrained_parts=[unet]"], True, r"pretrained_parts without vae"),
        (["data.flip_probability=0.5"], True, r"^data: data\.flip_probability=0\.5: cached latents"),
        (["data.cache_latents=false", "data.cache_text_embeddings=true"], True, r"needs data\.cache_latents=true"),
    ],
)
def test_refusals_name_the_key_before_anything_is_built(files, tmp_path, extra, with_file, match):
    from sgm.training.preflight import ConfigError, check_config, check_data

    cfg = compose_train(
        train_overrides(tmp_path, tmp_path / "no_images_needed", files[0] if with_file else None, *extra)
    )
    check_config(cfg)
    with pytest.raises(ConfigError, match=match):
        check_data(cfg)
    assert not (tmp_path / "cache").exists()

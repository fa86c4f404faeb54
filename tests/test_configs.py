"""Every shipped config loads and instantiates (model configs on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from training_utils import TRAIN_GROUPS, check_launcher_config, check_train_config

from sgm.models.build import build_model, config_root, load_model_config, shipped_model_configs

ALL_CONFIGS = sorted(p.relative_to(config_root()).as_posix() for p in config_root().rglob("*.yaml"))


def test_config_tree_is_found():
    assert {"sdxl_base", "sdxl_refiner", "tiny", "tiny_refiner"} <= set(shipped_model_configs())


@pytest.mark.parametrize("relative", ALL_CONFIGS)
def test_every_shipped_config_loads_and_instantiates(relative, tmp_path_factory):
    cfg = OmegaConf.load(config_root() / relative)
    group = Path(relative).parts[0]
    if group == "model":
        model = build_model(cfg, device="meta")
        assert model.unet.context_dim == model.conditioner.output_dims["crossattn"]
    elif group == "data":
        _check_data_config(cfg, tmp_path_factory)
    elif group in TRAIN_GROUPS or relative == "train.yaml":
        check_train_config(relative, tmp_path_factory.mktemp("train"))
    elif relative.startswith("hydra/launcher/"):
        check_launcher_config(relative)
    elif relative.startswith("hydra/job_logging/"):
        _check_job_logging_config(relative)
    else:  # pragma: no cover - other groups arrive with the training issue
        pytest.fail(f"no loader test for config group '{group}' yet: add one here")


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="shipped configs: .*sdxl_base"):
        load_model_config("sdxl_tiny_typo")


def _check_job_logging_config(relative: str) -> None:
    """train.yaml's job logging: console handlers only (train.log is opened after the checks, by the run)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_root()), version_base=None):
        cfg = compose(config_name="train", return_hydra_config=True)
    shipped = OmegaConf.load(config_root() / relative)
    assert OmegaConf.to_container(cfg.hydra.job_logging) == OmegaConf.to_container(shipped)
    handlers = OmegaConf.to_container(cfg.hydra.job_logging.handlers)
    assert handlers and not any("File" in handler["class"] for handler in handlers.values())


def _check_data_config(cfg, tmp_path_factory) -> None:
    """Point the config at generated shards, instantiate the partial as training does, take a batch."""
    from test_data_loader import make_dataset  # generated img2dataset-format shards

    folder = tmp_path_factory.mktemp("shards")
    make_dataset(folder, [12, 12], shapes=[(128, 128), (96, 96)])
    cfg.shards = str(folder / "shard-{0..1}.tar")
    cfg.num_workers = 0
    if cfg._target_.endswith("LatentLoader"):  # cache the shards first, as a user would
        _check_latent_config(cfg, folder, tmp_path_factory.mktemp("latents"))
        return
    make_loader = instantiate(cfg)
    loader = make_loader(rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["jpg"].dtype == torch.uint8 and batch["jpg"].shape[0] == cfg.batch_size
    h, w = batch["target_size_as_tuple"][0].tolist()
    assert tuple(batch["jpg"].shape[2:]) == (h, w)


def _check_latent_config(cfg, image_folder: Path, cache: Path) -> None:
    """Cache generated shards with the tiny model, point the config there, take a batch."""
    from conftest import fresh_tiny_model

    from sgm.data.latent_cache import CacheConfig, cache_latents

    settings = CacheConfig(square_size=64, latent_mode="mean", text_embeddings=bool(cfg.text_embeddings))
    cache_latents(fresh_tiny_model(), str(image_folder / "shard-*.tar"), cache, settings, progress=False)
    cfg.shards = str(cache / "*.tar")
    loader = instantiate(cfg)(rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["latents"].shape == (cfg.batch_size, 4, 8, 8) and "jpg" not in batch
    assert set(batch["cached_embeddings"]) == {0, 1} and batch["target_size_as_tuple"][0].tolist() == [64, 64]
    assert set(loader.empty_caption_outputs()) == {0, 1}

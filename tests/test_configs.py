"""Every shipped config loads and instantiates (model configs on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from training_utils import TRAIN_GROUPS, check_train_config

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
    else:  # pragma: no cover - other groups arrive with the training issue
        pytest.fail(f"no loader test for config group '{group}' yet: add one here")


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="shipped configs: .*sdxl_base"):
        load_model_config("sdxl_tiny_typo")


def _check_data_config(cfg, tmp_path_factory) -> None:
    """Point the config at generated shards, instantiate the partial as training does, take a batch."""
    from test_data_loader import make_dataset  # generated img2dataset-format shards

    folder = tmp_path_factory.mktemp("shards")
    make_dataset(folder, [12, 12], shapes=[(128, 128), (96, 96)])
    cfg.shards = str(folder / "shard-{0..1}.tar")
    cfg.num_workers = 0
    make_loader = instantiate(cfg)
    loader = make_loader(rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["jpg"].dtype == torch.uint8 and batch["jpg"].shape[0] == cfg.batch_size
    h, w = batch["target_size_as_tuple"][0].tolist()
    assert tuple(batch["jpg"].shape[2:]) == (h, w)

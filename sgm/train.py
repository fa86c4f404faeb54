"""Train an SDXL-class model: the Hydra entry point, `python -m sgm.train` (in a checkout also `python train.py`).

    python -m sgm.train                                   # demo: tiny model on the emoji data, a few minutes on CPU
    python -m sgm.train name=run1 trainer.max_steps=500 strategy=ddp trainer.devices=2
    python -m sgm.train name=run1 resume=auto             # continue the newest checkpoint of outputs/runs/run1

It composes the shipped configs (configs/train.yaml, found by sgm.config_dir, so an installed package
trains without a checkout) and hands them to sgm.training.run, which builds everything and trains.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sgm import config_dir
from sgm.training.run import main_entry


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    main_entry(cfg)  # run(cfg); a mistake in the settings: one message, exit code 2


if __name__ == "__main__":
    main()

"""Train an SDXL-class model: `python train.py` runs the tiny demo job on CPU; see configs/train.yaml.

    python train.py                                   # demo: tiny model on the emoji data, a few minutes on CPU
    python train.py name=run1 trainer.max_steps=500 strategy=ddp trainer.devices=2
    python train.py name=run1 resume=auto             # continue the newest checkpoint of outputs/runs/run1

A thin Hydra entry point: everything it builds is in sgm/training and configured in configs/.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sgm.training.run import run


@hydra.main(version_base=None, config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

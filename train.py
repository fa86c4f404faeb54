"""Train an SDXL-class model: `python train.py` runs the tiny demo job on CPU; see configs/train.yaml.

    python train.py                                   # demo: tiny model on the emoji data, a few minutes on CPU
    python train.py name=run1 trainer.max_steps=500 strategy=ddp trainer.devices=2
    python train.py name=run1 resume=auto             # continue the newest checkpoint of outputs/runs/run1

The checkout's shortcut for `python -m sgm.train` (the thin Hydra entry point, which an installed package
runs the same way): everything it builds is in sgm/training and configured in configs/.
"""

from sgm.train import main

if __name__ == "__main__":
    main()

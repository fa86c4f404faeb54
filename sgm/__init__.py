"""sgm: train SDXL-class text-to-image diffusion models."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The shipped Hydra configs (train.yaml and its groups): the one place every module finds them.

    An installed package carries them as sgm/configs (pyproject.toml ships the repository's top-level configs/
    there); a source checkout, editable install included, has them as configs/ next to the package."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"the shipped configs are missing: neither {package / 'configs'} nor {package.parent / 'configs'} holds "
        "train.yaml; reinstall the package (pip install .) or run from a full source checkout"
    )

"""A non-editable install works outside the checkout: inspect, the demo and the README's training job.

A fresh venv gets the package as `pip install .` installs it, but offline (--no-deps --no-build-isolation;
the dependencies are this environment's site-packages, added by a .pth file, whose own .pth files, the
editable install's import hook among them, then stay inactive). Every command runs in a temporary folder,
so neither the checkout's configs/ nor its data/ scripts are reachable: the configs must come from the
installed package (sgm/configs) and the library must import nothing from data/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "sgm", "configs")  # what `pip install .` builds from


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the fresh venv's python, its site-packages holding sgm, a working folder outside the checkout)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy: a build in the checkout would write build/ and sgm.egg-info there
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    dependencies = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (site / "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--no-compile",
        "--disable-pip-version-check",
        "--target",
        str(site),
        str(source),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cwd = root / "cwd"
    cwd.mkdir()
    return python, site, cwd


def run(installed, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    python, _, cwd = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def test_the_installed_package_and_its_configs_are_the_ones_imported(installed):
    site = installed[1]
    probe = "import json, sys, sgm; print(json.dumps([sgm.__file__, str(sgm.config_dir()), repr(sys.meta_path)]))"
    package_file, configs, finders = json.loads(run(installed, "-c", probe).stdout)
    assert Path(package_file).is_relative_to(site) and Path(configs) == site / "sgm" / "configs"
    assert "Editable" not in finders  # a module missing from the install cannot come from the checkout
    shipped = {p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")}
    assert {p.relative_to(configs) for p in Path(configs).rglob("*.yaml")} == shipped


def test_pyproject_lists_every_package_of_the_tree():
    """pyproject.toml names the packages (configs/ must map into sgm/): a new sub-package needs its line there."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sgm").rglob("__init__.py")}
    assert listed == tree | {"sgm.configs"}


def test_inspect_counts_sdxl_base(installed):
    out = run(installed, "-m", "sgm.inspect", "sdxl_base").stdout
    assert "model config: sdxl_base" in out and "model.diffusion_model." in out
    assert out.splitlines()[-1].startswith("total")


def test_demo_builds_saves_reloads_and_samples(installed):
    out_dir = installed[2] / "demo"
    run(installed, "-m", "sgm.demo", "--out", str(out_dir), "--steps", "2")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["reload_identical"] and (out_dir / "samples.png").is_file()


def test_training_runs_as_a_module_with_the_shipped_configs(installed):
    """The README's main job (`python train.py`, here `python -m sgm.train`), shortened: it builds its
    demo data and writes its run under outputs/ of the working folder."""
    cwd = installed[2]
    overrides = [
        "name=installed",
        "demo_data.num_samples=16",
        "demo_data.num_emoji=2",
        "demo_data.samples_per_shard=8",
        "demo_data.val_samples=4",  # and the demo's held-out set, validation and VAE training, shortened
        "validation.timestep_buckets=2",
        "demo_vae.steps=2",
        "demo_vae.scale_batches=1",
        "data.base_resolution=null",
        "data.square_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "trainer.max_steps=2",
        "checkpoint.every_n_train_steps=2",
        "samples.every_n_steps=0",
        "samples.at_train_end=false",
        "logger=csv",
        "threads=1",
    ]
    run(installed, "-m", "sgm.train", *overrides)
    run_dir = cwd / "outputs" / "runs" / "installed"
    assert len(list((cwd / "outputs" / "demo_data").glob("*.tar"))) == 2
    outputs = json.loads((run_dir / "outputs.json").read_text())
    assert outputs["global_step"] == "2" and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "installed_full.safetensors").is_file()  # the export, official layout
    assert list((cwd / "outputs" / "demo_vae").glob("vae-*.safetensors")) and (run_dir / "validation.jsonl").is_file()

"""python -m sgm.inspect: counts per component, key lists, file matching."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import REFERENCE_DIR, randomize_

from sgm.checkpoint.io import save_checkpoint
from sgm.inspect import main
from sgm.models.build import build_model


def test_counts_for_sdxl_base(capsys):
    assert main(["sdxl_base"]) == 0
    out = capsys.readouterr().out
    assert "2,567,463,684" in out and "83,653,863" in out and "3,468,837,945" in out


def test_keys_listing_equals_the_reference_file(capsys):
    assert main(["sdxl_refiner", "--keys"]) == 0
    ours = sorted(capsys.readouterr().out.strip().splitlines())
    assert ours == sorted((REFERENCE_DIR / "sdxl_refiner_keys.tsv").read_text().strip().splitlines())


def test_file_is_matched_to_its_config(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize_(build_model("tiny"))
    full = save_checkpoint(model, tmp_path / "tiny.safetensors", dtype=torch.float16)
    unet = save_checkpoint(model, tmp_path / "unet.safetensors", parts=["unet"])
    assert main([str(full)]) == 0
    out = capsys.readouterr().out
    assert "matches: tiny (full model)" in out and "F16" in out
    assert main([str(unet)]) == 0
    assert "matches: tiny (parts: unet)" in capsys.readouterr().out


def test_unknown_config_exits_with_a_message():
    result = subprocess.run(
        [sys.executable, "-m", "sgm.inspect", "sdxl_huge"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "unknown model config 'sdxl_huge'" in result.stderr and "sdxl_base" in result.stderr


def test_a_reader_that_stops_early_ends_the_listing_quietly():
    """`python -m sgm.inspect sdxl_refiner --keys | head -1`: the pipe closes early; no BrokenPipeError."""
    listing = subprocess.Popen(
        [sys.executable, "-m", "sgm.inspect", "sdxl_refiner", "--keys"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    first = listing.stdout.readline()
    listing.stdout.close()  # what head does after its line
    _, errors = listing.communicate(timeout=120)
    assert first.startswith(b"model.diffusion_model.") or first.startswith(b"conditioner.")
    assert listing.returncode == 0 and b"Traceback" not in errors and b"BrokenPipe" not in errors

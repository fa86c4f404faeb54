"""The UNet train-step benchmark: FLOP convention against the SDXL reference, and a real tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from sgm.benchmarks.unet_train_step import UNET_CONFIGS, count_train_step_flops, main, ours_forward, peak_flops
from sgm.models.unet import UNetModel


def test_sdxl_base_flops_per_image_at_256px_match_reference():
    """1.231 TFLOP per image per train step (forward + backward) at 256 px; counted on meta, no compute.

    The reference counts 2 FLOPs per multiply-add and a backward of about 2x forward for every matmul and
    conv (attention included); slightly under 3x forward overall because the first conv and the text-context
    k/v projections need no input gradient. We get 1.23084e12 (forward alone 0.42778e12).
    """
    cfg = UNET_CONFIGS["sdxl_base"]
    flops = count_train_step_flops(lambda: UNetModel(**cfg), ours_forward, cfg, batch_size=1, resolution=256)
    assert flops == pytest.approx(1.231e12, rel=1e-3)


def test_flops_scale_with_batch():
    cfg = UNET_CONFIGS["tiny"]
    one, two = (count_train_step_flops(lambda: UNetModel(**cfg), ours_forward, cfg, b, 64) for b in (1, 2))
    assert two == 2 * one > 0


def test_main_runs_tiny_on_cpu_and_reports_positive_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--config",
                "tiny",
                "--resolution",
                "64",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--device",
                "cpu",
                "--compare-diffusers",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ours" in printed and "diffusers" in printed and "ours/diffusers" in printed
    results = json.loads(out.read_text())
    ours, theirs = results["models"]["ours"], results["models"]["diffusers"]
    for figures in (ours, theirs):
        for key in ("step_s_median", "images_per_s", "flops_per_image", "achieved_flops_per_s", "peak_memory_bytes"):
            assert figures[key] > 0, key
        assert figures["mfu"] is None  # CPU: no known peak
    assert ours["params"] == theirs["params"]  # same architecture...
    assert ours["flops_per_image"] == theirs["flops_per_image"]  # ...and the same work
    assert results["ratio_ours_over_diffusers"] > 0


def test_peak_table_and_override():
    assert peak_flops(torch.device("cpu"), "bf16", None) is None
    assert peak_flops(torch.device("cpu"), "bf16", 100.0) == 100e12


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        main(["--config", "huge"])
    with pytest.raises(SystemExit):
        main(["--config", "tiny", "--resolution", "80", "--device", "cpu"])  # latent 10 is not divisible by 4

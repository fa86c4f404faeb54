"""`python train.py` end to end in a subprocess: its outputs. (SIGKILL + resume=auto, bit-exact:
test_training_exact_resume.py; 2-process DDP: test_training_ddp.py; the default wandb logger offline: the
stage runs of test_training_stages.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fresh_tiny_model
from training_utils import fast_overrides, make_shards, train_cli

from sgm.checkpoint.io import load_checkpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("demo"), num_samples=48, num_emoji=4, samples_per_shard=12)


def check(result) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_train_py_writes_checkpoint_export_samples_logs_and_config(tmp_path, shards):
    run_dir = tmp_path / "run"
    result = train_cli(fast_overrides(run_dir, shards, max_steps=4, every=2))
    check(result)
    outputs = json.loads((run_dir / "outputs.json").read_text())
    for key in ("checkpoint", "export", "samples", "logs", "config"):
        assert f"[sgm] {key}: " in result.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "step000002.ckpt").is_file()
    assert outputs["samples"].endswith(".png") and (run_dir / "logs" / "metrics.csv").is_file()
    assert (run_dir / "config.yaml").read_text().count("max_steps: 4") == 1
    model = fresh_tiny_model(seed=5)
    load_checkpoint(model, run_dir / "test_full.safetensors")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4
    assert not any(k.startswith(("model.vae.", "model.conditioner.")) for k in state["state_dict"])

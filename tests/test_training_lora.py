"""LoRA training through the training module and `python train.py experiment=lora_demo`: what trains, what the
checkpoint holds, what the run writes. (The adapters themselves: test_lora.py; diffusers' loader:
test_lora_diffusers.py; bit-exact resume of LoRA runs under DDP and ZeRO-2: test_training_exact_resume.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_, tiny_batch
from safetensors import safe_open
from test_trainable import optimizer_of
from test_training_units import make_module
from training_utils import make_shards, train_cli

from sgm.checkpoint.kohya import apply_lora_file
from sgm.checkpoint.model_source import load_model
from sgm.models.lora import LoRAConfig, apply_lora

LORA = {
    "unet": {"mode": "lora", "lora": {"rank": 4, "targets": "attn_mlp"}},
    "text_encoder_1": {"mode": "lora", "lr": 5e-4, "lora": {"rank": 2}},
}


def test_a_lora_module_trains_the_adapters_alone_and_lowers_the_loss_on_a_fixed_batch():
    module = make_module(ema_decay=0.9, lr=1e-2, trainable=LORA)
    randomize_(module.model.unet, seed=3)  # a fresh UNet's zero output layer would hide every adapter
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    optimizer = optimizer_of(module)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("unet", 1e-2), ("text_encoder_1", 5e-4)]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.adapters.parameters()}
    assert not any(p.requires_grad for p in module.model.parameters())
    batch = tiny_batch(4, size=64)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        torch.manual_seed(2)  # the same noise and noise levels every time: a fixed objective
        return module.loss_fn(module.model.unet, latents, module.model.condition(batch)).mean()

    with torch.no_grad():
        start = loss().item()
    module.train()
    for _ in range(30):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        assert all(g is not None for g in grads)  # the bigG adapters too: gradients pass the frozen tower
        optimizer.step()
    with torch.no_grad():
        assert loss().item() < 0.99 * start  # a fixed objective: it only moves if the adapters learn
    assert all(torch.equal(v, base[k]) for k, v in module.model.state_dict().items())  # base bit-identical
    state = module.state_dict()
    assert not any(k.startswith("model.") for k in state)  # the base comes from the run's recorded sources
    assert {k for k in state if k.startswith("adapters.")} == {f"adapters.{k}" for k in module.adapters.state_dict()}
    assert any(k.startswith("ema.adapters.") for k in state)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["sgm_trainable_modes"] == {"unet": "lora", "text_encoder_1": "lora"}
    with pytest.raises(ValueError, match="module.trainable says"):
        make_module(trainable={"unet": None}).on_load_checkpoint(checkpoint)


def test_trainable_settings_errors_name_the_key():
    with pytest.raises(ValueError, match=r"module.trainable.unet.mode: 'lorra' is not one of full, lora, frozen"):
        make_module(trainable={"unet": {"mode": "lorra"}})
    with pytest.raises(ValueError, match=r"module.trainable.unet: `lora` settings need mode: lora"):
        make_module(trainable={"unet": {"lora": {"rank": 4}}})
    with pytest.raises(ValueError, match=r"module.trainable.unet.lora: .*ranks?"):
        make_module(trainable={"unet": {"mode": "lora", "lora": {"ranks": 4}}})
    frozen_unet = make_module(trainable={"unet": {"mode": "frozen"}, "text_encoder_1": {"mode": "lora"}})
    assert frozen_unet.trainable.modes == {"text_encoder_1": "lora"}


@pytest.mark.slow
def test_lora_demo_writes_a_kohya_adapter_and_samples_and_loads_back(tmp_path):
    shards = make_shards(tmp_path / "demo", num_samples=16, num_emoji=2, samples_per_shard=8)
    run_dir = tmp_path / "run"
    result = train_cli(
        [
            "experiment=lora_demo",
            f"run_dir={run_dir}",
            "name=test",
            f"demo_data.out={shards}",
            f"data.shards={shards}/*.tar",
            "data.num_workers=0",
            "trainer.max_steps=4",
            "checkpoint.every_n_train_steps=2",
            "samples.num_steps=2",
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    adapter = run_dir / "test_lora.safetensors"
    assert f"[sgm] lora: {adapter}" in result.stdout and list((run_dir / "samples").glob("*.png"))
    assert not (run_dir / "test_full.safetensors").exists()
    with safe_open(str(adapter), "pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert metadata["ss_network_module"] == "networks.lora" and metadata["sgm.steps"] == "4"
    assert json.loads(metadata["sgm.config"])["unet"]["targets"] == "attn_mlp"
    assert json.loads(metadata["sgm.base_fingerprint"]).keys() >= {"unet", "text_encoder_1"}
    # the run as a model (adapters merged at scale 1) equals its recorded base with the file applied
    merged = load_model(run_dir)
    base = load_model(run_dir)  # again, then the adapters taken back out by applying them negated
    apply_lora_file(base.model, adapter, scale=-1.0).merge_into(base.model, scale=-1.0)
    assert merged.info["lora_merged"] == len({k.split(".")[0] for k in keys})
    expected = apply_lora(base.model, {"unet": LoRAConfig(8, targets="attn_mlp")})  # key set of the preset
    assert {k for k in keys if k.startswith("lora_unet_")} == set(expected.state_dict())

"""The memory estimate: its arithmetic on SDXL base's real counts, its verdicts, its method, and the presets it describes."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from training_utils import compose_train

from sgm.benchmarks.memory_estimate import (
    GIB,
    LORA_SETUPS,
    SETUPS,
    _GPULikeForward,
    activation_bytes,
    estimate,
    main,
    model_counts,
)
from sgm.models.build import load_model_config
from sgm.training.run import build_module

UNET = 2_567_463_684  # SDXL base UNet parameters (sd_xl_base_1.0.safetensors)
FROZEN = 83_653_863 + 123_060_480 + 694_659_841  # VAE, CLIP ViT-L/14, OpenCLIP ViT-bigG/14 parameters
UNET_TENSORS = 1680  # each gets a 4-byte `step` tensor in torch's optimizers
ADAFACTOR_VALUES = 244_330_500  # row + column factors over the real shapes (+ full state of 1-D tensors)
BY_NAME = {setup.name: setup for setup in SETUPS}


@pytest.fixture(scope="module")
def counts():
    """SDXL base built on meta, 1024 px, batch 1 (the presets' case); about 20-40 s on 2 cores."""
    return model_counts("sdxl_base", 1024, 1)


def test_counts_are_sdxl_base(counts):
    assert counts["unet_params"] == UNET and counts["frozen_params"] == FROZEN
    assert len(counts["unet_shapes"]) == UNET_TENSORS


def test_state_arithmetic_on_known_counts(counts):
    adamw = estimate(BY_NAME["bf16_adamw"], counts=counts)
    assert adamw.weights == adamw.grads == UNET * 4  # fp32 master weights and gradients under bf16-mixed
    assert adamw.optimizer_state == UNET * 8 + 4 * UNET_TENSORS  # two fp32 moments
    adafactor = estimate(BY_NAME["finetune_24gb"], counts=counts)
    assert adafactor.optimizer_state == ADAFACTOR_VALUES * 4 + 4 * UNET_TENSORS
    assert adafactor.optimizer_state < 0.05 * adamw.optimizer_state
    bytes_per_param = estimate(BY_NAME["bf16_adamw8bit"], counts=counts).optimizer_state / UNET
    assert 2.0 < bytes_per_param < 2.05  # uint8 moments + one fp32 scale per 256 values
    bf16 = estimate(BY_NAME["bf16_true_adafactor"], counts=counts)
    assert bf16.weights == bf16.grads == UNET * 2 and bf16.optimizer_state < adafactor.optimizer_state


def test_adafactor_state_is_mostly_the_3x3_convs(counts):
    """torch's Adafactor factors a tensor's last two dims, which for a conv are its kernel: a 3x3 conv keeps
    6 values per (out, in) pair, a 1x1 skip conv 2 (twice its weight). Hence 0.9 GiB, not a few MiB."""
    convs = [s for s in counts["unet_shapes"] if len(s) == 4]
    conv_values = sum(s[0] * s[1] * (6 if s[2:] == (3, 3) else 2) for s in convs)
    assert {s[2:] for s in convs} == {(3, 3), (1, 1)}
    assert conv_values > 0.95 * ADAFACTOR_VALUES


def test_frozen_parts_count_only_without_caches(counts):
    assert estimate(BY_NAME["finetune_24gb"], counts=counts).frozen_parts == 0
    assert estimate(BY_NAME["finetune_24gb_uncached"], counts=counts).frozen_parts == FROZEN * 4


def test_the_24gb_presets_fit_and_plain_adamw_does_not(counts):
    totals = {name: estimate(setup, counts=counts).total / GIB for name, setup in BY_NAME.items()}
    assert totals["finetune_24gb"] < 24 and totals["finetune_24gb_zero2_offload"] < 24
    assert totals["fp32_adamw_plain"] > 40  # fp32 AdamW: 16 bytes per parameter before activations
    assert totals["bf16_adamw"] > 24 and totals["bf16_adamw8bit"] > 24 and totals["finetune_24gb_uncached"] > 24
    accumulating = estimate(BY_NAME["finetune_24gb"], accumulate_grad_batches=4, counts=counts)
    assert accumulating.total / GIB > 24  # why the preset keeps accumulate_grad_batches=1


def test_total_is_the_larger_phase_plus_overhead(counts):
    e = estimate(BY_NAME["finetune_24gb"], counts=counts)
    assert e.backward_peak == e.weights + e.grads + e.optimizer_state + e.activations
    assert e.forward_peak < e.backward_peak and e.total == e.backward_peak + e.overhead
    assert 1 * GIB < e.activations < 3 * GIB  # checkpointed 1024 px, batch 1


def test_zero2_offload_follows_deepspeeds_own_estimate(counts):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    host, gpu = estimate_zero2_model_states_mem_needs(UNET, num_gpus_per_node=1, cpu_offload=True)
    e = estimate(BY_NAME["finetune_24gb_zero2_offload"], counts=counts)
    assert e.weights + e.grads + e.optimizer_state == gpu and e.host_memory == host


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_checkpointed_forward_keeps_what_torch_checkpoint_keeps(precision):
    """The method's model of checkpointing (block inputs + tensors saved outside blocks), against the UNet's
    real torch.utils.checkpoint forward on meta, counted the same way."""
    with torch.device("meta"):
        unet = instantiate(load_model_config("tiny").unet)
    modelled = activation_bytes(unet, 256, 2, precision)["forward_ckpt"]
    unet.set_gradient_checkpointing(True)
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    saved, alive = {}, []

    def pack(t):
        alive.append(t)
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    dtype = next(unet.parameters()).dtype
    inputs = (
        torch.empty(2, 4, 32, 32, device="meta", dtype=dtype),
        torch.zeros(2, dtype=torch.long, device="meta"),
        torch.empty(2, 77, 96, device="meta", dtype=dtype),
        torch.empty(2, 1600, device="meta", dtype=dtype),
    )
    with _GPULikeForward(autocast=False), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(*inputs)
    assert modelled == sum(saved.values()) > 0


def test_cli_prints_a_labelled_table_and_json(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    assert main(["--model", "tiny", "--resolution", "256", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ESTIMATES" in printed and all(name in printed for name in BY_NAME)
    payload = json.loads(out.read_text())
    assert payload["settings"]["resolution"] == 256 and len(payload["estimates"]) == len(SETUPS)
    for e in payload["estimates"]:
        assert e["total"] == max(e["forward_peak"], e["backward_peak"]) + e["overhead"]
    assert main(["--model", "tiny", "--resolution", "256", "--lora-rank", "4", "--text-encoder-lora-rank", "2"]) == 0
    assert "lora_r4_no_ckpt" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["finetune_24gb", "finetune_24gb_zero2_offload"])
def test_preset_configs_are_the_estimated_setups(name):
    setup, cfg = BY_NAME[name], compose_train([f"experiment={name}"])
    assert setup.config == f"experiment={name}"
    assert cfg.model == load_model_config("sdxl_base") and cfg.data.batch_size == 1
    assert cfg.module.optimizer == setup.optimizer and cfg.module.gradient_checkpointing is True
    assert cfg.module.ema_decay is None and cfg.trainer.accumulate_grad_batches == 1
    assert cfg.data._target_.endswith("LatentLoader") and cfg.data.text_embeddings and cfg.module.offload_frozen
    assert cfg.trainer.precision == "bf16-mixed"
    offload = cfg.trainer.strategy.config.zero_optimization if setup.zero2_offload else None
    assert cfg.trainer.strategy == "auto" if offload is None else offload.offload_optimizer.device == "cpu"


def test_preset_without_the_users_checkpoint_says_which_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's default path is relative: make sure no such file is here
    cfg = compose_train(["experiment=finetune_24gb", "model=tiny"])
    with pytest.raises(FileNotFoundError, match=r"pretrained=sd_xl_base_1.0.safetensors: no such file"):
        build_module(cfg)


# -- LoRA ------------------------------------------------------------------------------------------------
LORA = {setup.name: setup for setup in LORA_SETUPS}


def test_adapter_count_is_what_apply_lora_creates():
    """The estimate's adapter parameters = those apply_lora builds (tiny model, real CPU weights)."""
    from conftest import fresh_tiny_model

    from sgm.benchmarks.memory_estimate import Setup, lora_parts
    from sgm.models.lora import apply_lora

    setup = Setup("t", "bf16-mixed", "adamw", cached=False, trainable=lora_parts(4, "attn_mlp", 2), base_bf16=True)
    counts = model_counts("tiny", 256, 1, (setup,))
    info = counts["passes"][next(iter(counts["passes"]))]
    network = apply_lora(fresh_tiny_model(), setup.lora)
    assert info["adapter_params"] == info["trained_params"] == sum(p.numel() for p in network.parameters()) > 0


@pytest.fixture(scope="module")
def lora_counts():
    return model_counts("sdxl_base", 1024, 1, tuple(LORA.values()))


def test_lora_estimates_fit_their_gpus_and_beat_the_full_unet(lora_counts, counts):
    totals = {name: estimate(s, counts=lora_counts).total / GIB for name, s in LORA.items()}
    assert totals["lora_24gb"] < 24 - 1 and totals["lora_12gb"] < 12 - 1  # with headroom
    assert totals["lora_24gb_bf16base"] < totals["lora_24gb"]
    assert totals["lora_24gb_no_te"] < totals["lora_24gb"] and totals["lora_12gb"] < totals["lora_12gb_te"]
    assert totals["lora_24gb_no_ckpt"] > totals["lora_24gb"] and totals["lora_12gb_no_ckpt"] > totals["lora_12gb"]
    full = estimate(BY_NAME["bf16_adamw"], counts=counts)
    assert all(estimate(s, counts=lora_counts).weights < full.weights / 20 for s in LORA.values())
    assert totals["lora_12gb"] < full.total / GIB and totals["lora_24gb"] < full.total / GIB


@pytest.mark.parametrize("name", ["lora_24gb", "lora_12gb"])
def test_lora_preset_configs_are_the_estimated_setups(name):
    from sgm.training.trainable import TrainableSet

    setup, cfg = LORA[name], compose_train([f"experiment={name}"])
    assert setup.config == f"experiment={name}" and cfg.model == load_model_config("sdxl_base")
    assert cfg.data.batch_size == setup.batch_size and cfg.trainer.precision == setup.precision
    assert cfg.module.gradient_checkpointing is True and cfg.module.optimizer == setup.optimizer
    parts = TrainableSet(cfg.module.trainable).parts
    assert {n: (p.mode, p.lora) for n, p in parts.items()} == {p.name: (p.mode, p.lora) for p in setup.trainable}

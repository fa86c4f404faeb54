"""Optimizer choice: each optimizer trains, its state has the size the memory estimate assumes, bad input fails clearly."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.errors import InstantiationException
from torch import nn
from torch.utils.cpp_extension import get_default_build_root
from training_utils import compose_train, fast_overrides, make_shards

from sgm.training.optim import (
    BNB_BLOCK_SIZE,
    OPTIMIZERS,
    build_optimizer,
    check_optimizer_name,
    optimizer_state_bytes,
    state_bytes_per_tensor,
)
from sgm.training.run import build_module, run

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
BNB_QMAP_BYTES = 2 * 256 * 4  # bitsandbytes' two shared fp32 quantisation maps (signed and unsigned)
# DeepSpeed compiles its CPU Adam on first use (1-4 minutes here): test it where this environment has a build
# (conftest.py gives each environment its own TORCH_EXTENSIONS_DIR: another one's build would be recompiled).
EXTENSIONS = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
CPU_ADAM_BUILT = any(EXTENSIONS.glob("**/cpu_adam/cpu_adam*.so"))
BUILD_CPU_ADAM = (
    f"TORCH_EXTENSIONS_DIR={EXTENSIONS} python -c "
    "'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'"
)

# (name, lr): Adafactor's lr caps a step *relative* to each weight's RMS, so it takes a larger value.
TRAINABLE = [
    ("adamw", 1e-2),
    ("adafactor", 1e-1),
    pytest.param("adamw8bit", 1e-2, marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")),
    pytest.param(
        "deepspeed_cpu_adam",
        1e-2,
        marks=pytest.mark.skipif(
            not CPU_ADAM_BUILT, reason=f"DeepSpeed's CPU Adam not built yet (first use compiles it): {BUILD_CPU_ADAM}"
        ),
    ),
]


def tiny_net() -> nn.Module:
    """Linear layers big enough for 8-bit state (>= 4096 values), a 3x3 conv, biases (1-D state)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 128), nn.SiLU(), nn.Linear(128, 64)
    )


def fit(name: str, lr: float, steps: int) -> tuple[list[float], torch.optim.Optimizer, nn.Module]:
    net = tiny_net()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, 4, 4, generator=generator), torch.randn(32, 64, generator=generator)
    optimizer = build_optimizer(name, net.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer, net


@pytest.mark.parametrize(("name", "lr"), TRAINABLE)
def test_each_optimizer_lowers_the_loss(name, lr):
    losses, _, _ = fit(name, lr, steps=40)
    assert losses[-1] < 0.7 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize(("name", "lr"), TRAINABLE)
def test_state_size_matches_the_per_shape_formula(name, lr):
    """The memory estimate multiplies these per-shape sizes over SDXL's real shapes: check them on real state."""
    _, optimizer, net = fit(name, lr, steps=1)
    expected = sum(state_bytes_per_tensor(name, p.shape, p.dtype) for p in net.parameters())
    if name == "adamw8bit":
        expected += BNB_QMAP_BYTES
    assert optimizer_state_bytes(optimizer) == expected


def test_adafactor_state_is_much_smaller_than_adamw():
    _, adamw, _ = fit("adamw", 1e-2, steps=1)
    _, adafactor, net = fit("adafactor", 1e-1, steps=1)
    adamw_bytes, adafactor_bytes = optimizer_state_bytes(adamw), optimizer_state_bytes(adafactor)
    assert adafactor_bytes < 0.1 * adamw_bytes, (adafactor_bytes, adamw_bytes)
    # A Linear [out, in] keeps out + in values; a 3x3 conv only factors its kernel (6 of 9 values kept).
    linear, conv = net[2].weight, net[0].weight
    assert adafactor.state[linear]["row_var"].numel() + adafactor.state[linear]["col_var"].numel() == 128 + 256
    assert state_bytes_per_tensor("adafactor", conv.shape) - 4 == (6 * conv.numel() // 9) * 4


def test_adamw8bit_formula_counts_blockwise_scales():
    n = 20 * BNB_BLOCK_SIZE + 1  # 21 blocks, over the 4096-value threshold
    assert state_bytes_per_tensor("adamw8bit", (n,)) == 2 * n + 2 * 4 * 21
    assert state_bytes_per_tensor("adamw8bit", (64, 32)) == 2 * 64 * 32 * 4  # under 4096 values: fp32 state


def test_adafactor_takes_lr_as_a_relative_step_and_extra_arguments():
    """One step moves each weight by about lr x RMS(weight): the semantics the docs describe."""
    weight = nn.Parameter(torch.full((8, 8), 2.0))
    optimizer = build_optimizer("adafactor", [weight], lr=1e-3, weight_decay=0.0, extra={"eps": [None, 1e-3]})
    weight.grad = torch.ones(8, 8)
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((8, 8), 2.0 - 1e-3 * 2.0))
    assert optimizer.param_groups[0]["eps"] == (None, 1e-3)


def test_unknown_optimizer_name_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'adam_w'.*choose one of: adamw, adafactor, adamw8bit"):
        check_optimizer_name("adam_w")
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer("sgd", [nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ValueError, match="module.optimizer_kwargs"):
        build_optimizer("adamw", [nn.Parameter(torch.zeros(2))], lr=1.0, extra={"not_an_arg": 1})


def test_adamw8bit_without_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(ImportError, match=r"pip install bitsandbytes"):
        build_optimizer("adamw8bit", [nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_config_choice_reaches_configure_optimizers(tmp_path):
    cfg = compose_train(
        ["experiment=tiny_cpu", f"run_dir={tmp_path}", "module.optimizer=adafactor", "+module.optimizer_kwargs.d=2.0"]
    )
    module = build_module(cfg)
    module.trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert optimizer.param_groups[0]["d"] == 2.0
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.model.unet.parameters()}  # the UNet only, never the frozen parts


def test_bad_optimizer_in_config_fails_when_the_module_is_built(tmp_path):
    cfg = compose_train([f"run_dir={tmp_path}", "module.optimizer=lion"])
    with pytest.raises(InstantiationException, match="unknown optimizer 'lion'"):  # Hydra wraps the ValueError
        build_module(cfg)


def test_every_optimizer_name_has_a_state_formula():
    for name in OPTIMIZERS:
        assert state_bytes_per_tensor(name, (16, 16)) > 0


def test_adafactor_in_a_real_run_steps_and_checkpoints_its_factored_state(tmp_path):
    shards = make_shards(tmp_path / "shards", num_samples=16, num_emoji=2, samples_per_shard=8)
    overrides = fast_overrides(tmp_path / "run", shards, max_steps=4, every=4)
    outputs = run(
        compose_train([*overrides, "module.optimizer=adafactor", "module.lr=1e-2", "samples.at_train_end=false"])
    )
    assert outputs["global_step"] == "4"
    saved = torch.load(outputs["checkpoint"], map_location="cpu", weights_only=False)
    states = saved["optimizer_states"][0]["state"].values()
    assert any("row_var" in state and "col_var" in state for state in states)
    assert all(int(state["step"]) == 4 for state in states)

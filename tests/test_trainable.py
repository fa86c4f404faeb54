"""The trainable set: which parts train decides the optimizer's groups, the EMA, the checkpoint and the frozen parts."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_batch
from test_training_units import make_module
from training_utils import compose_train

from sgm.parallel import DeepSpeedPlan
from sgm.training.module import NonFiniteLossError
from sgm.training.run import build_module
from sgm.training.trainable import TrainableSet

TEXT_ENCODER_1 = "model.conditioner.embedders.1."
UNET_AND_TEXT_ENCODER = {"unet": None, "text_encoder_1": {"lr": 1e-5, "weight_decay": 0.0}}


def optimizer_of(module) -> torch.optim.Optimizer:
    module.trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False)
    return module.configure_optimizers()["optimizer"]


def test_default_trains_the_unet_alone():
    module = make_module(ema_decay=0.9)
    assert module.trainable.names == ("unet",)
    optimizer = optimizer_of(module)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == module.lr
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in trained} == {id(p) for p in module.model.unet.parameters()} and len(trained) == len(
        list(module.model.unet.parameters())
    )
    assert set(module.ema.weights()) == {f"model.unet.{k}" for k, _ in module.model.unet.named_parameters()}
    assert not any(p.requires_grad for p in module.model.conditioner.parameters())
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["sgm_trainable"] == ["unet"]


def test_unet_and_a_text_encoder_train_with_their_own_settings():
    module = make_module(ema_decay=0.9, lr=1e-4, weight_decay=0.01, trainable=UNET_AND_TEXT_ENCODER)
    groups = optimizer_of(module).param_groups
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("unet", 1e-4, 0.01),
        ("text_encoder_1", 1e-5, 0.0),
    ]
    encoder = module.model.conditioner.embedders[1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in encoder.parameters() if p.dim() > 0}
    assert not encoder.model.logit_scale.requires_grad  # unused 0-dim constant stays frozen
    state = module.state_dict()
    assert any(k.startswith("model.unet.") for k in state) and any(k.startswith(TEXT_ENCODER_1) for k in state)
    assert not any(k.startswith(("model.vae.", "model.conditioner.embedders.0.")) for k in state)
    ema = module.ema.weights()
    assert any(k.startswith("model.unet.") for k in ema) and any(k.startswith(TEXT_ENCODER_1) for k in ema)
    assert all(f"ema.{k}" in state for k in ema)
    # gradients reach the trained text encoder through the conditioner, not the frozen one
    latents = torch.randn(2, 4, 8, 8)
    cond = module.model.condition(tiny_batch(2, size=64))
    module.loss_fn(module.model.unet, latents, cond).mean().backward()
    assert any(p.grad is not None for p in encoder.parameters())
    assert all(p.grad is None for p in module.model.conditioner.embedders[0].parameters())


def test_both_text_encoders_train_every_weight_their_forward_uses_and_nothing_else():
    """CLIP-L's last block and final LayerNorm (SDXL reads its penultimate states) and bigG's logit_scale stay
    frozen and out of the optimizer; every weight in the optimizer gets a gradient (what DDP requires)."""
    module = make_module(trainable={"unet": None, "text_encoder_0": None, "text_encoder_1": None})
    optimizer = optimizer_of(module)
    clip_l = module.model.conditioner.embedders[0]
    unused = set(clip_l.unused_parameter_names())
    last = len(clip_l.model.transformer.resblocks) - 1
    assert unused and all(n.startswith((f"model.transformer.resblocks.{last}.", "model.ln_final.")) for n in unused)
    assert not any(p.requires_grad for n, p in clip_l.named_parameters() if n in unused)
    latents = torch.randn(2, 4, 8, 8)
    cond = module.model.condition(tiny_batch(2, size=64))
    module.loss_fn(module.model.unet, latents, cond).mean().backward()
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder_0", "text_encoder_1"]
    assert all(p.grad is not None for p in in_optimizer)


def test_checkpoint_round_trip_and_a_changed_trainable_set():
    trained = make_module(ema_decay=0.9, trainable=UNET_AND_TEXT_ENCODER)
    with torch.no_grad():
        trained.model.conditioner.embedders[1].model.text_projection.fill_(0.5)
    trained.ema.update(trained.trained_parameters())
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    resumed = make_module(ema_decay=0.9, trainable=UNET_AND_TEXT_ENCODER)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.all(resumed.model.conditioner.embedders[1].model.text_projection == 0.5)
    key = TEXT_ENCODER_1 + "model.text_projection"
    assert torch.equal(resumed.ema.weights()[key], trained.ema.weights()[key]) and int(resumed.ema.num_updates) == 1
    with pytest.raises(
        ValueError,
        match=r"trained \{'unet': 'full', 'text_encoder_1': 'full'\} but module.trainable says \{'unet': 'full'\}",
    ):
        make_module().on_load_checkpoint(checkpoint)


def test_unknown_parts_and_settings_fail_with_the_valid_names():
    with pytest.raises(
        ValueError,
        match=r"unknown trainable part\(s\) \['vae', 'text_encoder_2'\].*parts: unet, "
        r"text_encoder_0 \(CLIPTextEmbedder\), text_encoder_1 \(OpenCLIPTextEmbedder\)$",
    ):
        make_module(trainable={"unet": None, "vae": None, "text_encoder_2": None})  # embedder 2 has no weights
    with pytest.raises(ValueError, match=r"module.trainable.unet: unknown setting\(s\) \['learning_rate'\]"):
        TrainableSet({"unet": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match="module.trainable is empty"):
        TrainableSet({})


def test_frozen_parts_stay_in_eval_mode_after_train():
    module = make_module(trainable=UNET_AND_TEXT_ENCODER)
    module.train()
    embedders = module.model.conditioner.embedders
    assert module.model.unet.training and embedders[1].training
    assert not embedders[0].training and not module.model.vae.training
    default = make_module().train()
    assert not default.model.conditioner.training and not default.model.vae.training


def test_config_names_the_trainable_set(tmp_path):
    cfg = compose_train(["experiment=tiny_cpu", f"run_dir={tmp_path}", "+module.trainable.text_encoder_0.lr=2e-6"])
    module = build_module(cfg)
    assert module.trainable.names == ("unet", "text_encoder_0") and module.trainable.parts["text_encoder_0"].lr == 2e-6
    assert module.trainable.parts["unet"].lr is None  # the train.yaml default: module.lr


def test_legacy_unet_ema_keys_load():
    module = make_module(ema_decay=0.9)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("ema.")}
    state |= {f"ema.shadow.{k}": torch.full_like(v, 0.25) for k, v in module.model.unet.named_parameters()}
    state["ema.num_updates"] = torch.tensor(7)
    module.load_state_dict(state, strict=True)
    assert torch.all(module.ema.weights()["model.unet.out.2.weight"] == 0.25) and int(module.ema.num_updates) == 7


def test_ema_weights_swap_in_for_sampling_and_back():
    module = make_module(ema_decay=0.9)
    live = module.model.unet.out[2].weight
    before = live.detach().clone()
    module.ema.weights()["model.unet.out.2.weight"].fill_(0.75)
    with module.ema_applied() as model:
        assert torch.all(model.unet.out[2].weight == 0.75)
    assert model.unet.out[2].weight is live and torch.equal(live, before)
    with module.ema_applied(use_ema=False) as model:
        assert torch.equal(model.unet.out[2].weight, before)


def test_a_plan_that_cannot_skip_steps_stops_at_the_first_nonfinite_loss():
    module = make_module()
    module._skip_step(1)  # DDP: skipped, counted
    assert module.nonfinite_total == 1
    module.plan = DeepSpeedPlan({"zero_optimization": {"stage": 2}})
    with pytest.raises(NonFiniteLossError, match="DeepSpeed cannot skip an optimizer step"):
        module._skip_step(1)

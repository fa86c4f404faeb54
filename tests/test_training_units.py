"""Training pieces on their own: LR schedule, EMA, frozen parts, checkpoint contents, atomic saves, export."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fresh_tiny_model
from torch import nn

from sgm.checkpoint.io import load_checkpoint, read_metadata
from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling
from sgm.diffusion.loss import DiffusionLoss
from sgm.diffusion.noise_levels import DiscreteTimestepSampler
from sgm.diffusion.weighting import EpsWeighting
from sgm.parallel import newest_checkpoint
from sgm.training.checkpoint_io import AtomicCheckpointIO
from sgm.training.ema import EMA
from sgm.training.lr import warmup_schedule
from sgm.training.module import SDXLTrainingModule, pixels_to_unit_range

FROZEN_PARTS = ("model.conditioner.", "model.vae.")


def make_module(**kwargs) -> SDXLTrainingModule:
    def loss(denoiser):
        return DiffusionLoss(denoiser, DiscreteTimestepSampler(), EpsWeighting())

    return SDXLTrainingModule(fresh_tiny_model(), DiscreteDenoiser(EpsScaling()), loss, **kwargs)


def test_warmup_then_constant_and_cosine():
    constant = warmup_schedule(4, "constant")
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = warmup_schedule(2, "cosine", total_steps=12, min_ratio=0.1)
    assert cosine(1) == 1.0 and cosine(2) == pytest.approx(1.0)
    assert cosine(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(12) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        warmup_schedule(10, "cosine", total_steps=None)
    with pytest.raises(ValueError, match="constant"):
        warmup_schedule(0, "linear")


def test_ema_warmup_and_average():
    net = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)
    assert torch.allclose(ema.weights()["weight"], torch.full((1, 2), 0.9))  # 0.1 * 0 + 0.9 * 1
    for _ in range(200):
        ema.update(net)
    assert ema.current_decay() == 0.9 and int(ema.num_updates) == 201
    assert not ema.weights()["weight"].requires_grad
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(net, decay=1.0)


def test_pixels_map_to_unit_range():
    pixels = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    out = pixels_to_unit_range(pixels)
    assert out.dtype == torch.float32 and out.flatten().tolist() == pytest.approx(
        [-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6
    )
    with pytest.raises(TypeError, match="uint8"):
        pixels_to_unit_range(pixels.float())


def test_frozen_parts_stay_out_of_grads_optimizer_and_checkpoint():
    module = make_module(ema_decay=0.99)
    module.train()
    assert not module.model.vae.training and not module.model.conditioner.training
    assert all(not p.requires_grad for p in module.model.vae.parameters())
    assert all(not p.requires_grad for p in module.model.conditioner.parameters())
    state = module.state_dict()
    assert any(k.startswith("model.unet.") for k in state) and any(k.startswith("ema.model.unet.") for k in state)
    assert not any(k.startswith(FROZEN_PARTS) for k in state)
    assert "denoiser.sigmas" in state
    full = make_module(save_frozen_parts=True).state_dict()
    assert any(k.startswith("model.vae.") for k in full)
    # a fresh module (frozen parts from its config) accepts the checkpoint
    other = make_module(ema_decay=0.99)
    checkpoint = {"state_dict": dict(state)}
    other.on_load_checkpoint(checkpoint)
    other.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.equal(other.model.unet.out[-1].weight, module.model.unet.out[-1].weight)


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash mid-save")

    with pytest.raises(RuntimeError, match="crash mid-save"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind
    assert newest_checkpoint(tmp_path) == path and newest_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize("use_ema", [True, False])
def test_export_of_a_lone_checkpoint_writes_its_unet_with_ema_or_raw_weights(tmp_path, use_ema):
    """A checkpoint outside its run directory: only what it holds (the UNet) can be exported, EMA or raw;
    whole-run exports are compared tensor by tensor in test_model_source.py."""
    from sgm.checkpoint.export import export_model

    module = make_module(ema_decay=0.5)
    with torch.no_grad():
        module.ema.weights()["model.unet.out.2.weight"].fill_(0.25)
    ckpt = tmp_path / "train.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 7}, ckpt)
    out = export_model(
        ckpt,
        tmp_path / "out.safetensors",
        weights="ema" if use_ema else "raw",
        dtype=torch.float16,
        parts=["unet"],
        model_config="tiny",
    )
    assert out["weights"] == ("ema" if use_ema else "raw")
    loaded = fresh_tiny_model(seed=3)
    load_checkpoint(loaded, out["path"], parts=["unet"])
    expected = (
        module.ema.weights() if use_ema else {f"model.unet.{k}": v for k, v in module.model.unet.state_dict().items()}
    )
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, expected.get(f"model.unet.{key}", module.model.unet.state_dict()[key]).half().float())
    assert read_metadata(out["path"])["sgm.weights"] == ("ema" if use_ema else "raw")
    assert read_metadata(out["path"])["sgm.global_step"] == "7"


def test_switching_ema_on_at_resume_starts_it_from_the_trained_weights():
    trained = make_module()
    with torch.no_grad():
        trained.model.unet.out[-1].weight.fill_(0.5)
    checkpoint = {"state_dict": dict(trained.state_dict())}
    resumed = make_module(ema_decay=0.99)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.all(resumed.ema.weights()["model.unet.out.2.weight"] == 0.5) and int(resumed.ema.num_updates) == 0

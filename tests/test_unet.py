"""SDXL UNet: exact official layout and size, and a tiny model that trains on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_
from torch import nn

from sgm.models.layers import GroupNorm32, timestep_embedding
from sgm.models.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
REFINER_KWARGS = {
    "model_channels": 384,
    "channel_mult": (1, 2, 4, 4),
    "transformer_depth": (0, 4, 4, 0),
    "transformer_depth_middle": 4,
    "context_dim": 1280,
    "adm_in_channels": 2560,
}


def tiny_unet_config(shape: str = "base") -> dict:
    """Tiny UNet kwargs shaped like SDXL base (3 levels) or the refiner (4 levels, attention on 1 and 2)."""
    if shape == "base":  # context 32 + 64 (two text towers), y = 64 pooled + 6 x 256
        return {
            "model_channels": 32,
            "channel_mult": (1, 2, 4),
            "num_res_blocks": 2,
            "transformer_depth": (0, 1, 2),
            "transformer_depth_middle": 2,
            "num_head_channels": 16,
            "context_dim": 96,
            "adm_in_channels": 1600,
        }
    if shape == "refiner":  # one text tower, y = 64 pooled + 5 x 256
        return {
            "model_channels": 32,
            "channel_mult": (1, 2, 4, 4),
            "num_res_blocks": 1,
            "transformer_depth": (0, 1, 1, 0),
            "transformer_depth_middle": 1,
            "num_head_channels": 16,
            "context_dim": 64,
            "adm_in_channels": 1344,
        }
    raise ValueError(shape)


def tiny_inputs(cfg: dict, batch: int = 2, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, side, side, generator=gen),
        torch.tensor([3, 977][:batch] + [500] * (batch - 2)),
        torch.randn(batch, 77, cfg["context_dim"], generator=gen),
        torch.randn(batch, cfg["adm_in_channels"], generator=gen),
    )


def _layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {UNET_PREFIX + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _assert_same_layout(ours: dict, reference: dict) -> None:
    reference = {k: v for k, v in reference.items() if k.startswith(UNET_PREFIX)}
    missing = sorted(set(reference) - set(ours))
    unexpected = sorted(set(ours) - set(reference))
    mismatched = [(k, ours[k], reference[k]) for k in sorted(set(ours) & set(reference)) if ours[k] != reference[k]]
    assert not (missing or unexpected or mismatched), (
        f"missing {len(missing)}: {missing[:5]}\nunexpected {len(unexpected)}: {unexpected[:5]}\n"
        f"shape mismatches {len(mismatched)}: {mismatched[:5]}"
    )


@pytest.fixture(scope="module")
def meta_base() -> UNetModel:
    with torch.device("meta"):
        return UNetModel()


@pytest.fixture(scope="module")
def meta_refiner() -> UNetModel:
    with torch.device("meta"):
        return UNetModel(**REFINER_KWARGS)


def test_base_layout_matches_official_keys(meta_base, base_reference):
    _assert_same_layout(_layout(meta_base), base_reference)


def test_refiner_layout_matches_official_keys(meta_refiner, refiner_reference):
    _assert_same_layout(_layout(meta_refiner), refiner_reference)


def test_parameter_counts(meta_base, meta_refiner):
    assert sum(p.numel() for p in meta_base.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in meta_refiner.parameters()) == 2_259_526_660


def test_transformer_block_counts(meta_base, meta_refiner):
    def count(model: nn.Module) -> int:
        return sum(1 for name, _ in model.named_modules() if name.rsplit(".", 2)[-2:-1] == ["transformer_blocks"])

    assert count(meta_base) == 70
    assert count(meta_refiner) == 44


def test_fresh_model_has_zero_init_branches_and_predicts_zero():
    torch.manual_seed(0)
    cfg = tiny_unet_config()
    model = UNetModel(**cfg)
    zero = [n for n, p in model.named_parameters() if ("out_layers.3" in n or "proj_out" in n or n.startswith("out.2"))]
    assert len(zero) == 2 * (2 * 3 + 3 * 3 + 2) + 2 * (2 + 2 + 1 + 3 + 3) + 2  # resblocks, transformers, out conv
    assert all(torch.count_nonzero(model.get_parameter(n)) == 0 for n in zero)
    assert torch.count_nonzero(model.get_parameter("input_blocks.1.0.in_layers.2.weight")) > 0
    assert torch.count_nonzero(model(*tiny_inputs(cfg))) == 0


@pytest.mark.parametrize("shape", ["base", "refiner"])
def test_tiny_forward_backward(shape):
    torch.manual_seed(0)
    cfg = tiny_unet_config(shape)
    model = randomize_(UNetModel(**cfg), std=0.05)
    x, t, context, y = tiny_inputs(cfg)
    x.requires_grad_(True)
    out = model(x, t, context, y)
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Each conditioning path matters: the output changes with the timestep, the context and y.
    for changed in ((x, t.flip(0), context, y), (x, t, context.roll(1, 0), y), (x, t, context, y.roll(1, 0))):
        assert not torch.allclose(model(*changed), out, atol=1e-6)


def test_gradient_checkpointing_recomputes_and_matches():
    torch.manual_seed(0)
    cfg = tiny_unet_config()
    model = randomize_(UNetModel(**cfg), std=0.05)
    inputs = tiny_inputs(cfg)
    calls = [0]
    for block in [*model.input_blocks, model.middle_block, *model.output_blocks]:
        # A pre-hook: non-reentrant checkpointing stops recomputation early, before the block returns.
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    n_blocks = len(model.input_blocks) + 1 + len(model.output_blocks)

    def run(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.set_gradient_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        calls[0] = 0
        out = model(*inputs)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    plain_out, plain_grads = run(False)
    assert calls[0] == n_blocks
    ckpt_out, ckpt_grads = run(True)
    assert calls[0] == 2 * n_blocks  # every block ran again in backward
    assert torch.equal(plain_out, ckpt_out)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Not when there is nothing to recompute for: eval mode or no grad.
    calls[0] = 0
    with torch.no_grad():
        model(*inputs)
    model.eval()
    model(*inputs)
    assert calls[0] == 2 * n_blocks  # two forwards, no recomputation


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    cfg = {**tiny_unet_config(), "num_res_blocks": 1}  # the shape of configs/model/tiny.yaml
    model = UNetModel(**cfg)
    x, t, context, y = tiny_inputs(cfg, side=8)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x, t, context, y), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, f"loss went {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_builds_on_meta_and_checkpointing_flag_from_config():
    with torch.device("meta"):
        model = UNetModel(**tiny_unet_config(), gradient_checkpointing=True)
    assert model.gradient_checkpointing and all(p.is_meta for p in model.parameters())
    assert (model.context_dim, model.adm_in_channels) == (96, 1600)


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert timestep_embedding(torch.tensor([5]), 7).shape == (1, 7)


def test_group_norm_runs_in_fp32_and_keeps_input_dtype():
    torch.manual_seed(0)
    norm = GroupNorm32(4, 8).to(torch.bfloat16)
    nn.init.normal_(norm.weight)
    x = (torch.randn(2, 8, 5, 5) * 30 + 1000).to(torch.bfloat16)  # large mean: bf16 statistics would be poor
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), norm.eps)
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"transformer_depth": (0, 1)}, "one transformer depth per level"),
        ({"model_channels": 40}, "norm_num_groups"),
        ({"num_head_channels": 24}, "num_head_channels"),
    ],
)
def test_bad_config_fails_with_clear_message(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        UNetModel(**{**tiny_unet_config(), **kwargs})


def test_bad_inputs_fail_with_clear_message():
    cfg = tiny_unet_config()
    model = UNetModel(**cfg)
    x, t, context, y = tiny_inputs(cfg)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(x[..., :14], t, context, y)
    with pytest.raises(ValueError, match="context"):
        model(x, t, context[..., :32], y)
    with pytest.raises(ValueError, match="y"):
        model(x, t, context, y[:, :64])


def test_bf16_model_accepts_fp32_inputs():
    cfg = tiny_unet_config()
    model = randomize_(UNetModel(**cfg), std=0.05)
    inputs = tiny_inputs(cfg)
    reference = model(*inputs)
    out = model.to(torch.bfloat16)(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())

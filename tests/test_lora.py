"""LoRA / LoCon adapters: exact at step 0, train only the adapters, merge, kohya files and names."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_tiny_model, randomize_, tiny_batch

from sgm.checkpoint.kohya import (
    LoRAFileError,
    apply_lora_file,
    load_lora_file,
    lora_targets,
    save_lora_file,
)
from sgm.models.build import build_model
from sgm.models.lora import LoRAConfig, LoRAModule, apply_lora, select_targets

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_PARTS = {
    "unet": LoRAConfig(rank=4, alpha=2, targets="locon", conv_rank=2, conv_alpha=1),
    "text_encoder_0": LoRAConfig(rank=4, targets="attn_mlp"),
    "text_encoder_1": LoRAConfig(rank=2, alpha=4, targets="attn_mlp"),
}


def tiny(seed: int = 0):
    """The tiny SDXL model with every weight random (zero-init layers too), eval mode."""
    return randomize_(fresh_tiny_model(seed), seed=seed + 1).eval()


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([17, 941])


def outputs(model) -> dict[str, torch.Tensor]:
    """Conditioner outputs and the UNet output for a fixed batch."""
    x, t = inputs()
    with torch.no_grad():
        cond = model.condition(tiny_batch())
        return {**cond, "unet": model(x, t, cond)}


def randomize_adapters_(network, seed: int = 3, std: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return network


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_a_fresh_adapter_leaves_every_output_bit_identical():
    model = tiny()
    before = outputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    network = apply_lora(model, ALL_PARTS)
    after = outputs(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(model.state_dict()) == set(state)  # no renamed or added base keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # The network's state_dict keys are the kohya file keys.
    assert set(network.state_dict()) == {
        f"{n}.{s}" for n in network for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight" in network.state_dict()
    assert network.parts == ("text_encoder_0", "text_encoder_1", "unet")
    conv = network["lora_unet_input_blocks_1_0_in_layers_2"]
    assert conv.rank == 2 and float(conv.alpha) == 1.0 and conv.lora_down.kernel_size == (3, 3)
    skip = network["lora_unet_input_blocks_3_0_skip_connection"]
    assert skip.rank == 4 and skip.lora_down.kernel_size == (1, 1)  # 1x1 convs take the linear rank
    assert torch.equal(network["lora_unet_input_blocks_2_0_op"].lora_up.weight, torch.zeros(32, 2, 1, 1))
    # Adapters change the outputs once trained; removing them restores the base model exactly.
    randomize_adapters_(network)
    changed = outputs(model)
    assert all(not torch.equal(before[k], changed[k]) for k in before)
    network.remove()
    assert all(torch.equal(before[k], v) for k, v in outputs(model).items())


def _text_conditioning(model, batch, base_cond):
    """The conditioner's output with the text towers run with grad (the conditioner runs frozen towers
    under no_grad, so adapters on a frozen tower need this until the conditioner knows about adapters)."""
    clip_l, bigg = model.conditioner.embedders[0], model.conditioner.embedders[1]
    context_l = clip_l(batch["txt"])
    context_g, pooled = bigg(batch["txt"])
    crossattn = torch.cat([context_l, context_g], dim=-1)
    vector = torch.cat([pooled, base_cond["vector"][:, pooled.shape[1] :]], dim=-1)
    return {"crossattn": crossattn, "vector": vector}


def test_training_moves_only_the_adapters_and_the_loss_falls():
    torch.manual_seed(0)
    model = tiny()
    model.requires_grad_(False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    network = apply_lora(model, ALL_PARTS)
    assert all(p.requires_grad for p in network.parameters())
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    batch = tiny_batch()
    x, t = inputs()
    with torch.no_grad():
        base_cond = model.condition(batch)
        target = -model(x, t, base_cond)  # far from the base output, reachable through the adapters
    losses = []
    model.unet.train()
    for _ in range(6):
        cond = _text_conditioning(model, batch, base_cond)
        loss = F.mse_loss(model(x, t, cond), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95 and losses == sorted(losses, reverse=True), losses
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # Every adapter whose module runs got a gradient (CLIP-L's last block is never run: penultimate output).
    no_grad = sorted(n for n, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    assert all(n.startswith("lora_te1_text_model_encoder_layers_1_") for n in no_grad), no_grad
    assert any(n.startswith("lora_te2_") for n, p in network.named_parameters() if p.grad is not None)


def test_merge_into_equals_the_applied_network():
    applied, merged = tiny(), tiny()
    network = randomize_adapters_(apply_lora(applied, ALL_PARTS))
    want = outputs(applied)
    network.merge_into(merged, scale=1.0)
    got = outputs(merged)
    for key in want:
        assert max_rel_err(got[key], want[key]) <= 1e-5, key
    # Merging into the model it is applied to bakes the deltas and detaches the hooks (no double count).
    network.merge_into(applied)
    after = outputs(applied)
    for key in want:
        assert max_rel_err(after[key], want[key]) <= 1e-5, key


def test_merge_scale_and_network_scale_agree():
    applied, merged = tiny(), tiny()
    network = randomize_adapters_(apply_lora(applied, {"text_encoder_1": LoRAConfig(rank=3, targets="attn")}))
    network.set_scale(0.5)
    want = outputs(applied)
    network.merge_into(merged, scale=0.5)
    assert max_rel_err(outputs(merged)["vector"], want["vector"]) <= 1e-5


def test_several_networks_each_with_its_own_scale():
    model = tiny()
    base = outputs(model)
    first = randomize_adapters_(apply_lora(model, {"unet": LoRAConfig(rank=2)}), seed=4)
    alone = outputs(model)
    second = randomize_adapters_(apply_lora(model, {"unet": LoRAConfig(rank=4, targets="attn_mlp")}), seed=5)
    both = outputs(model)["unet"]
    assert not torch.equal(both, alone["unet"])
    second.set_scale(0.0)
    assert max_rel_err(outputs(model)["unet"], alone["unet"]) <= 1e-6
    first.remove()
    second.remove()
    assert torch.equal(outputs(model)["unet"], base["unet"])


def test_lora_file_size_scales_with_rank_and_carries_kohya_metadata(tmp_path):
    sizes = {}
    for rank in (2, 8):
        network = apply_lora(tiny(), {"unet": LoRAConfig(rank=rank, alpha=1, targets="attn_mlp")})
        path = save_lora_file(
            network, tmp_path / f"r{rank}.safetensors", {"sgm.steps": 7, "sgm.base_fingerprint": "ab"}
        )
        sizes[rank] = path.stat().st_size
    assert 3.2 < sizes[8] / sizes[2] < 4.0  # header overhead only
    state, meta = load_lora_file(tmp_path / "r8.safetensors")
    assert all(v.dtype == torch.float16 for k, v in state.items() if not k.endswith(".alpha"))
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "1")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["sgm.steps"] == "7" and meta["sgm.base_fingerprint"] == "ab"
    assert json.loads(meta["sgm.config"])["unet"]["targets"] == "attn_mlp"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_save_load_apply_round_trip(tmp_path):
    source = tiny()
    network = randomize_adapters_(apply_lora(source, ALL_PARTS))
    want = outputs(source)
    path = save_lora_file(network, tmp_path / "locon.safetensors", dtype=torch.float32)
    meta = load_lora_file(path)[1]
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    target = tiny()
    loaded = apply_lora_file(target, path)
    assert set(loaded.state_dict()) == set(network.state_dict())
    assert loaded["lora_unet_input_blocks_1_0_in_layers_2"].lora_down.kernel_size == (3, 3)
    assert float(loaded["lora_te2_text_model_encoder_layers_0_mlp_fc1"].alpha) == 4.0
    got = outputs(target)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    loaded.remove()
    half = apply_lora_file(target, path, scale=0.5)
    assert half.scale == 0.5 and not torch.equal(outputs(target)["unet"], want["unet"])


def test_foreign_keys_are_refused_in_one_error(tmp_path):
    network = apply_lora(tiny(), {"unet": LoRAConfig(rank=2)})
    state = {k: v.clone() for k, v in network.state_dict().items()}
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 320)  # diffusers / SD1.5
    state["lora_unet_input_blocks_1_0_in_layers_2.hada_w1_a"] = torch.zeros(4, 2)  # LyCORIS LoHa
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w1"] = torch.zeros(4, 4)  # LyCORIS LoKr
    state["lora_unet_middle_block_1_proj_in.lora_down.weight"] = torch.zeros(2, 7)
    state["lora_unet_middle_block_1_proj_in.lora_up.weight"] = torch.zeros(128, 2)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(LoRAFileError) as error:
        apply_lora_file(tiny(), tmp_path / "foreign.safetensors")
    message = str(error.value)
    for name in ("hada_w1_a", "lokr_w1", "down_blocks_0_attentions_0_proj_in", "middle_block_1_proj_in"):
        assert name in message
    assert "unknown keys (not kohya LoRA" in message and "shape mismatches (1)" in message


def test_kohya_names_cover_the_full_models():
    base, refiner = build_model("sdxl_base", device="meta"), build_model("sdxl_refiner", device="meta")
    targets = lora_targets(base)
    count = lambda ts, prefix: sum(n.startswith(prefix) for n in ts)  # noqa: E731
    # Every Linear / Conv2d weight of the UNet (ComfyUI's key map counts the same), 6 per text layer.
    assert count(targets, "lora_unet_") == 794
    assert count(targets, "lora_te1_") == 12 * 6 == 72
    assert count(targets, "lora_te2_") == 32 * 6 == 192
    refiner_targets = lora_targets(refiner)
    assert count(refiner_targets, "lora_unet_") == 554
    assert count(refiner_targets, "lora_te_") == 192 and not count(refiner_targets, "lora_te1_")
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_input_blocks_3_0_op",
        "lora_te1_text_model_encoder_layers_11_mlp_fc2",
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
    ):
        assert name in targets, name
    # kohya's default SDXL LoRA: 722 UNet modules (every Linear of the 11 spatial transformers).
    assert len(select_targets(targets.values(), "unet", LoRAConfig(targets="attn_mlp"))) == 722
    assert len(select_targets(targets.values(), "unet", LoRAConfig(targets="attn"))) == 70 * 8
    assert len(select_targets(targets.values(), "text_encoder_1", LoRAConfig(targets="attn"))) == 128
    locon = select_targets(targets.values(), "unet", LoRAConfig(targets="locon"))
    assert len(locon) > 722 and all(not t.path.startswith(("time_embed", "label_emb", "out.")) for t in locon)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        model.requires_grad_(False)
        network = randomize_adapters_(apply_lora(model, {"unet": LoRAConfig(rank=2, targets="locon")}))
        model.unet.set_gradient_checkpointing(checkpointing)
        model.unet.train()
        x, t = inputs()
        with torch.no_grad():
            cond = model.condition(tiny_batch())
        model(x, t, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in network.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_text_tower_dropout_path_matches_the_merged_path():
    """With adapter dropout in training the attention runs explicitly; at p=0 it equals the W + delta path."""
    model = tiny()
    network = randomize_adapters_(
        apply_lora(model, {"text_encoder_1": LoRAConfig(rank=2, targets="attn_mlp", dropout=0.1)})
    )
    tower = model.conditioner.embedders[1]
    tokens = tower.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():
        network.eval()
        want = tower(tokens)  # eval: no dropout, merged-weight path
        for module in network.values():
            module.dropout.p = 0.0
        network.train()
        got = tower(tokens)  # training with a (p=0) dropout module: explicit attention path
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for module in network.values():
        module.dropout.p = 0.5
    context, _ = tower(tokens)
    context.sum().backward()
    assert network["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"].lora_down.weight.grad is not None


def test_bf16_autocast_and_bf16_models():
    model = tiny()
    network = randomize_adapters_(apply_lora(model, ALL_PARTS), std=0.05)
    want = outputs(model)
    x, t = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cond = model.condition(tiny_batch())
        got = model(x, t, cond)
    assert max_rel_err(got.float(), want["unet"]) < 0.05
    model.to(torch.bfloat16)  # adapters stay fp32: the LoRA branch runs in fp32, cast to the output dtype
    with torch.no_grad():
        got = model.unet(x, t, want["crossattn"], want["vector"])
    assert got.dtype == torch.bfloat16 and max_rel_err(got.float(), want["unet"]) < 0.05
    assert all(p.dtype == torch.float32 for p in network.parameters())


def test_config_errors_are_clear():
    model = tiny()
    with pytest.raises(ValueError, match="not in this model"):
        apply_lora(model, {"text_encoder_7": LoRAConfig()})
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, {"unet": LoRAConfig(targets=["nothing_here"])})
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig(rank=0)
    network = apply_lora(model, {"unet": LoRAConfig(targets=[r"\.to_k$"])})
    assert all(name.endswith("_to_k") for name in network) and len(network) == 14
    with pytest.raises(RuntimeError, match="already applied"):
        network.attach(model)


def test_lora_module_init_follows_the_paper():
    module = LoRAModule(64, 32, rank=4, alpha=8)
    bound = 1 / math.sqrt(64)  # kaiming-uniform(a=sqrt(5)) on fan_in 64
    assert module.lora_down.weight.abs().max() <= bound and module.lora_down.weight.std() > bound / 4
    assert torch.equal(module.lora_up.weight, torch.zeros(32, 4))
    assert float(module.scale()) == 2.0 and module.delta_weight().shape == (32, 64)


def test_a_unet_compiled_in_place_sees_adapters_applied_later():
    model, reference = tiny(), tiny()
    x, t = inputs()
    cond = outputs(model)
    model.unet.compile(backend="eager")  # dynamo's tracing (the part that decides what hooks run), no codegen
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), cond["unet"])
    network = randomize_adapters_(apply_lora(model, {"unet": LoRAConfig(rank=2, targets="locon")}))
    apply_lora(reference, {"unet": LoRAConfig(rank=2, targets="locon")}).load_state_dict(network.state_dict())
    with torch.no_grad():
        got, want = model(x, t, cond), reference(x, t, cond)
    assert not torch.equal(want, cond["unet"])
    assert max_rel_err(got, want) <= 1e-5

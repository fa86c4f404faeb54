"""Our kohya LoRA / LoCon files, read by diffusers' SDXL LoRA loader, act as they do in our model.

diffusers (with peft) and transformers are test-only references: the tiny model's official-layout weights
go into diffusers' UNet2DConditionModel and transformers' CLIPTextModel / CLIPTextModelWithProjection (as
in test_unet_fidelity.py and test_text_encoders.py), the exported .safetensors goes through
`StableDiffusionXLLoraLoaderMixin.lora_state_dict` (kohya -> diffusers/peft keys, sgm block remap) and
`load_lora_into_unet` / `load_lora_into_text_encoder`, and every output must match ours with the adapter
applied. The merged model, saved in the official layout, must equal the adapter applied at scale 1.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import fresh_tiny_model, randomize_, tiny_batch
from test_text_encoders import _hf_config, _load_into_hf, _openclip_to_hf
from test_unet_fidelity import fourier_256

from sgm.benchmarks.unet_train_step import diffusers_unet_config
from sgm.checkpoint.io import load_checkpoint, save_checkpoint
from sgm.checkpoint.kohya import save_lora_file
from sgm.checkpoint.official_layout import to_official
from sgm.models.build import load_model_config
from sgm.models.lora import LoRAConfig, apply_lora
from sgm.models.tokenizers import EOT_ID

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PARTS = {
    "unet": LoRAConfig(rank=4, alpha=2, targets="locon", conv_rank=2, conv_alpha=3),
    "text_encoder_0": LoRAConfig(rank=4, alpha=8, targets="attn_mlp"),
    "text_encoder_1": LoRAConfig(rank=2, targets="attn_mlp"),
}
UNET_KEYS = (
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "transformer_depth",
    "transformer_depth_middle",
    "num_head_channels",
    "context_dim",
    "adm_in_channels",
)


def tiny():
    return randomize_(fresh_tiny_model(0), seed=1).eval()


def randomize_adapters_(network, seed: int = 3, std: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return network.eval()


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def diffusers_twins(official: dict[str, torch.Tensor], unet_cfg: dict):
    """diffusers UNet, CLIPTextModel (CLIP-L) and CLIPTextModelWithProjection (bigG) from official-layout weights."""
    config = diffusers_unet_config(unet_cfg)
    prefix = "model.diffusion_model."
    unet = diffusers.UNet2DConditionModel(**config).eval()
    unet.load_state_dict(
        convert_ldm_unet_checkpoint({k: v for k, v in official.items() if k.startswith(prefix)}, config)
    )
    te1 = transformers.CLIPTextModel(
        _hf_config(width=32, layers=2, heads=2, act="quick_gelu", projection_dim=32, pad_token_id=EOT_ID)
    ).eval()
    te1_prefix = "conditioner.embedders.0.transformer."
    _load_into_hf(te1, {k.removeprefix(te1_prefix): v for k, v in official.items() if k.startswith(te1_prefix)})
    te2 = transformers.CLIPTextModelWithProjection(
        _hf_config(width=64, layers=2, heads=4, act="gelu", projection_dim=64, pad_token_id=0)
    ).eval()
    te2_prefix = "conditioner.embedders.1."
    _load_into_hf(
        te2, _openclip_to_hf({k.removeprefix(te2_prefix): v for k, v in official.items() if k.startswith(te2_prefix)})
    )
    return unet, te1, te2


def reference_outputs(model, unet, te1, te2) -> dict[str, torch.Tensor]:
    """diffusers / transformers outputs for the batch that `ours` sees, with our tokens and micro-conditioning."""
    batch = tiny_batch()
    tokens = model.conditioner.embedders[0].tokenize(batch["txt"])
    tokens_g = model.conditioner.embedders[1].tokenize(batch["txt"])
    x, t = _unet_inputs()
    with torch.no_grad():
        context_l = te1(input_ids=tokens, output_hidden_states=True).hidden_states[-2]
        out_g = te2(input_ids=tokens_g, output_hidden_states=True)
        context = torch.cat([context_l, out_g.hidden_states[-2]], dim=-1)
        time_ids = torch.cat(
            [batch["original_size_as_tuple"], batch["crop_coords_top_left"], batch["target_size_as_tuple"]], dim=1
        )
        sample = unet(
            x,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": out_g.text_embeds, "time_ids": time_ids},
        ).sample
    vector = torch.cat([out_g.text_embeds, fourier_256(time_ids)], dim=1)
    return {"crossattn": context, "vector": vector, "unet": sample}


def our_outputs(model) -> dict[str, torch.Tensor]:
    x, t = _unet_inputs()
    with torch.no_grad():
        cond = model.condition(tiny_batch())
        return {**cond, "unet": model(x, t, cond)}


def _unet_inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([17, 941])


@pytest.fixture
def exported(tmp_path):
    """(our model with a random LoCon + text-encoder LoRA applied, the kohya file, the UNet config)."""
    model = tiny()
    network = randomize_adapters_(apply_lora(model, PARTS))
    path = save_lora_file(network, tmp_path / "locon.safetensors", dtype=torch.float32)
    unet_cfg = {k: v for k, v in load_model_config("tiny").unet.items() if k in UNET_KEYS}
    return model, network, path, unet_cfg


def test_diffusers_lora_loader_gives_our_outputs(exported):
    model, network, path, unet_cfg = exported
    network.remove()
    base_official = to_official(model, ("unet", "text_encoders"))
    unet, te1, te2 = diffusers_twins(base_official, unet_cfg)
    before = reference_outputs(model, unet, te1, te2)
    ours_base = our_outputs(model)
    for key in before:  # the twins agree without adapters
        assert max_rel_err(before[key], ours_base[key]) <= 1e-4, key

    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path), unet_config=unet.config)
    assert alphas, "kohya alphas reach diffusers"
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=unet)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, text_encoder=te1, prefix="text_encoder")
    StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(
        state, alphas, text_encoder=te2, prefix="text_encoder_2"
    )
    lora_layers = sum("lora_A" in name for name, _ in unet.named_parameters())
    assert lora_layers == sum(name.startswith("lora_unet_") for name in network)  # every adapter found its layer
    for tower, prefix in ((te1, "lora_te1_"), (te2, "lora_te2_")):
        assert sum("lora_A" in name for name, _ in tower.named_parameters()) == sum(
            n.startswith(prefix) for n in network
        )

    network.attach(model)
    want = reference_outputs(model, unet, te1, te2)
    got = our_outputs(model)
    for key in want:
        assert not torch.equal(want[key], before[key]), key  # the adapters act
        err = max_rel_err(got[key], want[key])
        print(f"{key}: max rel err vs diffusers+peft {err:.2e}")
        assert err <= 1e-4, key


def test_merged_official_file_equals_the_applied_adapter(exported, tmp_path):
    model, network, _, unet_cfg = exported
    want = our_outputs(model)
    merged = tiny()
    network.merge_into(merged)
    path = save_checkpoint(merged, tmp_path / "merged.safetensors", parts=("unet", "text_encoders"))
    reloaded = tiny()
    load_checkpoint(reloaded, path, parts=("unet", "text_encoders"))
    got = our_outputs(reloaded)
    for key in want:
        assert max_rel_err(got[key], want[key]) <= 1e-5, key
    # diffusers / transformers built from the merged file give the same outputs as well.
    unet, te1, te2 = diffusers_twins(to_official(reloaded, ("unet", "text_encoders")), unet_cfg)
    reference = reference_outputs(reloaded, unet, te1, te2)
    for key in want:
        assert max_rel_err(reference[key], want[key]) <= 1e-4, key

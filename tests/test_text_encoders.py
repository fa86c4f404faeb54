"""Text towers and tokenizers: official layout and size, padding rules, round trips, HF fidelity."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import randomize_

from sgm.models.text_encoders import CLIPTextEmbedder, OpenCLIPTextEmbedder
from sgm.models.tokenizers import EOT_ID, SOT_ID, CLIPBPETokenizer

os.environ["HF_HUB_OFFLINE"] = "1"

TINY = {"width": 64, "layers": 2, "heads": 4}
CAPTIONS = ["a photo of a cat sitting on a red sofa", "", "word " * 100]
POSITION_IDS = "transformer.text_model.embeddings.position_ids"


def rows(reference: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in reference.items() if k.startswith(prefix)}


def official_layout(module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.to_official(module.state_dict()).items()}


@pytest.fixture(scope="module")
def sdxl_towers() -> tuple[CLIPTextEmbedder, OpenCLIPTextEmbedder]:
    with torch.device("meta"):
        return CLIPTextEmbedder(), OpenCLIPTextEmbedder()


def tiny_clip_l(seed: int = 0) -> CLIPTextEmbedder:
    return randomize_(CLIPTextEmbedder(**TINY), seed=seed).eval()


def tiny_bigg(seed: int = 0) -> OpenCLIPTextEmbedder:
    return randomize_(OpenCLIPTextEmbedder(**TINY, output_dim=32), seed=seed).eval()


# --- layout and size ---------------------------------------------------------------------------


def test_base_text_towers_match_the_official_keys_and_shapes(sdxl_towers, base_reference):
    clip_l, bigg = sdxl_towers
    for module, prefix, count in ((clip_l, "conditioner.embedders.0.", 197), (bigg, "conditioner.embedders.1.", 390)):
        expected = rows(base_reference, prefix)
        assert len(expected) == count
        assert official_layout(module, prefix) == expected


def test_refiner_text_tower_matches_the_official_keys_and_shapes(sdxl_towers, refiner_reference):
    prefix = "conditioner.embedders.0."
    assert official_layout(sdxl_towers[1], prefix) == rows(refiner_reference, prefix)


def test_text_tower_sizes(sdxl_towers):
    clip_l, bigg = sdxl_towers
    official = clip_l.to_official(clip_l.state_dict())
    assert sum(v.numel() for v in official.values()) == 123_060_557  # incl. position_ids [1, 77]
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_557 - 77
    assert sum(p.numel() for p in bigg.parameters()) == 694_659_841
    assert official[POSITION_IDS].dtype == torch.int64
    assert clip_l.output_dims == {"crossattn": 768}
    assert bigg.output_dims == {"crossattn": 1280, "vector": 1280}
    assert not any(hasattr(m, "attn_mask") and m.attn_mask is not None for m in (clip_l.model, bigg.model))


def test_position_ids_are_0_to_76():
    official = tiny_clip_l().to_official(tiny_clip_l().state_dict())
    assert torch.equal(official[POSITION_IDS], torch.arange(77).unsqueeze(0))


def test_frozen_flag_and_device_of_tokens(sdxl_towers):
    tower = tiny_bigg()
    assert not tower.frozen
    assert tower.freeze() is tower and tower.frozen and not tower.training
    assert not tower.model.logit_scale.requires_grad
    assert sdxl_towers[0].tokenize(["a cat"]).device.type == "meta"


def test_vocab_too_small_for_the_bpe_is_a_clear_error():
    tower = CLIPTextEmbedder(width=32, layers=1, heads=2, vocab_size=1000)
    with pytest.raises(ValueError, match="vocab_size >= 49408"):
        tower(["a cat"])


# --- tokenization ------------------------------------------------------------------------------


def test_openclip_tokens_pad_with_zero_and_clip_l_with_eot():
    bigg_tokens = tiny_bigg().tokenize(["a cat"])[0]
    clip_tokens = tiny_clip_l().tokenize(["a cat"])[0]
    body = bigg_tokens[:4].tolist()
    assert body[0] == SOT_ID and body[3] == EOT_ID and bigg_tokens.shape == (77,)
    assert clip_tokens[:4].tolist() == body
    assert bigg_tokens[4:].eq(0).all()
    assert clip_tokens[4:].eq(EOT_ID).all()


@pytest.mark.parametrize("pad_id", [0, EOT_ID])
def test_empty_and_overlong_captions(pad_id):
    tokenizer = CLIPBPETokenizer(pad_id=pad_id)
    tokens = tokenizer(["", "word " * 100])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert tokens[0, :2].tolist() == [SOT_ID, EOT_ID] and tokens[0, 2:].eq(pad_id).all()
    ids = tokenizer.encode("word " * 100)
    assert tokens[1].tolist() == [SOT_ID, *ids[:75], EOT_ID]
    assert tokenizer("a cat").shape == (1, 77)  # one string is one caption


def test_captions_must_be_strings():
    with pytest.raises(TypeError, match="captions must be strings"):
        CLIPBPETokenizer()(["a cat", None])


def _hf_clip_tokenizer(tmp_path):
    """The Hugging Face CLIP tokenizer over the same BPE files, pad = EOT as for openai/clip-vit-large-patch14."""
    from transformers import CLIPTokenizer

    bpe = CLIPBPETokenizer().bpe
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = "\n".join(" ".join(pair) for pair in bpe.bpe_ranks)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")


def test_clip_l_tokens_equal_the_hugging_face_tokenizer(tmp_path):
    hf = _hf_clip_tokenizer(tmp_path)
    captions = CAPTIONS + ["Café déjà-vu, naïve 100% 🙂", "don't  STOP\tme\nnow", "x" * 400]
    expected = hf(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    assert torch.equal(tiny_clip_l().tokenize(captions), expected)


# --- state-dict conversion -----------------------------------------------------------------------


@pytest.mark.parametrize("factory", [tiny_clip_l, tiny_bigg])
def test_official_round_trip_reproduces_outputs(factory):
    source = factory(seed=1)
    official = source.to_official(source.state_dict())
    target = factory(seed=2)
    target.load_state_dict(target.from_official(official), strict=True)
    with torch.no_grad():
        expected, got = source(CAPTIONS), target(CAPTIONS)
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    for a, b in zip(as_tuple(expected), as_tuple(got), strict=True):
        assert torch.equal(a, b)


def test_clip_l_from_official_accepts_missing_position_ids_and_rejects_wrong_ones():
    tower = tiny_clip_l()
    official = tower.to_official(tower.state_dict())
    without = {k: v for k, v in official.items() if k != POSITION_IDS}
    tower.load_state_dict(tower.from_official(without), strict=True)
    shuffled = dict(official, **{POSITION_IDS: official[POSITION_IDS].flip(-1)})
    with pytest.raises(ValueError, match="position_ids"):
        tower.from_official(shuffled)
    floats = dict(official, **{POSITION_IDS: official[POSITION_IDS].float()})
    tower.from_official(floats)  # exact integers stored as floats are fine


def test_clip_l_conversion_errors_name_the_key():
    tower = tiny_clip_l()
    official = tower.to_official(tower.state_dict())
    with pytest.raises(ValueError, match="unexpected official key 'model.ln_final.weight'"):
        tower.from_official({**official, "model.ln_final.weight": torch.zeros(64)})
    q_key = "transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=r"layer 1 lacks self_attn \['q'\]"):
        tower.from_official({k: v for k, v in official.items() if k != q_key})
    with pytest.raises(ValueError, match="no official name"):
        tower.to_official({"transformer.text_model.final_layer_norm.weight": torch.zeros(64)})


def test_clip_l_in_proj_split_order_is_q_k_v():
    tower = tiny_clip_l()
    in_proj = tower.model.transformer.resblocks[0].attn.in_proj_weight
    official = tower.to_official(tower.state_dict())
    for index, name in enumerate("qkv"):
        part = official[f"transformer.text_model.encoder.layers.0.self_attn.{name}_proj.weight"]
        assert torch.equal(part, in_proj[64 * index : 64 * (index + 1)])


# --- fidelity to Hugging Face transformers -------------------------------------------------------


def _hf_config(width: int, layers: int, heads: int, act: str, projection_dim: int, pad_token_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        bos_token_id=SOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=pad_token_id,
        attention_dropout=0.0,
    )


def _load_into_hf(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load HF-named tensors, following the model's own prefix for the text transformer."""
    wanted = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        candidates = [key, key.removeprefix("text_model.")]
        match = next((c for c in candidates if c in wanted), None)
        if match is None and key.endswith("position_ids"):
            continue  # not a persistent buffer in recent transformers releases
        assert match is not None, key
        renamed[match] = value
    model.load_state_dict(renamed, strict=True)


def _openclip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official open_clip text-tower keys -> CLIPTextModelWithProjection keys (test-only converter)."""
    out = {
        "text_model.embeddings.token_embedding.weight": state["model.token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["model.positional_embedding"],
        "text_model.final_layer_norm.weight": state["model.ln_final.weight"],
        "text_model.final_layer_norm.bias": state["model.ln_final.bias"],
        "text_projection.weight": state["model.text_projection"].t(),
    }
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    layers = 1 + max(int(k.split(".")[3]) for k in state if ".resblocks." in k)
    for i in range(layers):
        src, dst = f"model.transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", state[f"{src}attn.in_proj_{kind}"].chunk(3)):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = part
            for ours, theirs in names.items():
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
    return out


def test_clip_l_matches_transformers_clip_text_model():
    from transformers import CLIPTextModel

    tower = tiny_clip_l(seed=4)
    official = tower.to_official(tower.state_dict())
    reference = CLIPTextModel(_hf_config(**TINY, act="quick_gelu", projection_dim=64, pad_token_id=EOT_ID)).eval()
    _load_into_hf(reference, {k.removeprefix("transformer."): v for k, v in official.items()})
    tokens = tower.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = reference(input_ids=tokens, output_hidden_states=True).hidden_states[-2]
        got = tower(CAPTIONS)
    assert got.shape == (3, 77, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bigg_matches_transformers_clip_text_model_with_projection():
    from transformers import CLIPTextModelWithProjection

    tower = tiny_bigg(seed=5)
    reference = CLIPTextModelWithProjection(_hf_config(**TINY, act="gelu", projection_dim=32, pad_token_id=0)).eval()
    _load_into_hf(reference, _openclip_to_hf(tower.to_official(tower.state_dict())))
    tokens = tower.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = reference(input_ids=tokens, output_hidden_states=True)
        context, pooled = tower(CAPTIONS)
    assert context.shape == (3, 77, 64) and pooled.shape == (3, 32)
    torch.testing.assert_close(context, expected.hidden_states[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected.text_embeds, atol=1e-5, rtol=1e-5)


def test_pooling_reads_the_eot_position():
    tower = tiny_bigg(seed=6)
    tokens = tower.tokenize(["a cat", "a much longer caption about a cat"])
    with torch.no_grad():
        _, last = tower.run_blocks(tokens, through_last=True)
        _, pooled = tower(tokens)
    eot = (tokens == EOT_ID).int().argmax(dim=1)
    manual = tower.model.ln_final(last)[torch.arange(2), eot] @ tower.model.text_projection
    torch.testing.assert_close(pooled, manual)

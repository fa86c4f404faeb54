"""The conditioner: reference vector layout, concatenation order and CFG dropout."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fresh_tiny_model, tiny_batch

from sgm.models.build import build_model
from sgm.models.conditioner import Conditioner, FourierEmbedder


@pytest.fixture(scope="module")
def tiny():
    return fresh_tiny_model()


def reference_fourier(value: float, dim: int = 256) -> torch.Tensor:
    """Written independently from the spec: freqs exp(-ln(1e4) i / 128), [cos | sin]."""
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float64)
    return torch.cat([torch.cos(value * freqs), torch.sin(value * freqs)]).float()


def test_fourier_embedding_matches_spec_formula():
    emb = FourierEmbedder(num_values=2)(torch.tensor([[1024.0, 768.0]]))
    assert emb.shape == (1, 512)
    torch.testing.assert_close(emb[0, :256], reference_fourier(1024.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(emb[0, 256:], reference_fourier(768.0), atol=1e-4, rtol=0)
    zero = FourierEmbedder(num_values=1)(torch.zeros(3))
    assert torch.equal(zero[:, :128], torch.ones(3, 128)) and torch.equal(zero[:, 128:], torch.zeros(3, 128))


def test_fourier_rejects_wrong_value_count():
    with pytest.raises(ValueError, match="expected 2 value"):
        FourierEmbedder(num_values=2)(torch.zeros(2, 3))


def test_base_vector_and_context_follow_the_reference_layout(tiny):
    batch = tiny_batch(2)
    cond = tiny.conditioner(batch)
    clip_l, big_g = tiny.conditioner.embedders[0], tiny.conditioner.embedders[1]
    with torch.no_grad():
        context_l = clip_l(batch["txt"])
        context_g, pooled = big_g(batch["txt"])
    assert cond["crossattn"].shape == (2, 77, 96)
    torch.testing.assert_close(cond["crossattn"], torch.cat([context_l, context_g], dim=-1))
    vector = cond["vector"]
    assert vector.shape == (2, 64 + 6 * 256)
    torch.testing.assert_close(vector[:, :64], pooled)
    oh, ow = batch["original_size_as_tuple"][0].tolist()
    top, left = batch["crop_coords_top_left"][0].tolist()
    th, tw = batch["target_size_as_tuple"][0].tolist()
    for slot, value in enumerate([oh, ow, top, left, th, tw]):
        start = 64 + 256 * slot
        torch.testing.assert_close(vector[0, start : start + 256], reference_fourier(value), atol=1e-4, rtol=0)


def test_refiner_vector_layout():
    torch.manual_seed(0)
    model = build_model("tiny_refiner")
    batch = tiny_batch(2, refiner=True)
    cond = model.conditioner(batch)
    assert cond["crossattn"].shape == (2, 77, 64)
    assert cond["vector"].shape == (2, 64 + 5 * 256)
    torch.testing.assert_close(cond["vector"][0, -256:], reference_fourier(6.0), atol=1e-4, rtol=0)


def test_zero_keys_zero_text_but_keep_sizes(tiny):
    cond = tiny.conditioner(tiny_batch(2), zero_keys=("txt",))
    assert torch.count_nonzero(cond["crossattn"]) == 0
    assert torch.count_nonzero(cond["vector"][:, :64]) == 0
    assert torch.count_nonzero(cond["vector"][:, 64:]) > 0


def test_per_embedder_dropout_zeroes_whole_samples(tiny):
    conditioner = tiny.conditioner
    batch = tiny_batch(8)
    full = conditioner(batch)
    old = list(conditioner.ucg_rates)
    try:
        conditioner.ucg_rates = [0.5, 0.0, 0.0, 0.0, 0.0]
        out = conditioner(batch, apply_dropout=True, generator=torch.Generator().manual_seed(3))
        clip_part = out["crossattn"][..., :32]
        dropped = [i for i in range(8) if torch.count_nonzero(clip_part[i]) == 0]
        kept = [i for i in range(8) if i not in dropped]
        assert dropped and kept, "a 0.5 rate over 8 samples with this seed drops some and keeps some"
        torch.testing.assert_close(clip_part[kept], full["crossattn"][kept, :, :32])
        torch.testing.assert_close(out["crossattn"][..., 32:], full["crossattn"][..., 32:])
        no_drop = conditioner(batch, apply_dropout=False)
        torch.testing.assert_close(no_drop["crossattn"], full["crossattn"])
    finally:
        conditioner.ucg_rates = old


def test_caption_dropout_uses_the_empty_prompt_for_both_encoders(tiny):
    conditioner = tiny.conditioner
    batch = tiny_batch(2)
    conditioner.caption_dropout_rate = 1.0
    try:
        dropped = conditioner(batch, apply_dropout=True)
    finally:
        conditioner.caption_dropout_rate = 0.0
    empty = conditioner({**batch, "txt": ["", ""]})
    torch.testing.assert_close(dropped["crossattn"], empty["crossattn"])
    torch.testing.assert_close(dropped["vector"], empty["vector"])
    assert not torch.allclose(dropped["crossattn"], conditioner(batch)["crossattn"])


def test_missing_batch_key_is_a_clear_error(tiny):
    batch = tiny_batch(1)
    del batch["crop_coords_top_left"]
    with pytest.raises(KeyError, match="crop_coords_top_left"):
        tiny.conditioner(batch)


def test_bad_embedder_entries_are_rejected():
    with pytest.raises(ValueError, match="input_key"):
        Conditioner([{"module": FourierEmbedder()}])
    with pytest.raises(ValueError, match="ucg_rate"):
        Conditioner([{"module": FourierEmbedder(), "input_key": "x", "ucg_rate": 2}])


def test_dimension_mismatch_between_conditioner_and_unet_is_caught():
    from omegaconf import OmegaConf

    from sgm.models.build import load_model_config

    cfg = load_model_config("tiny")
    cfg.unet.context_dim = 95
    with pytest.raises(Exception, match="context_dim"):
        build_model(OmegaConf.create(cfg))


# -- precomputed (cached) text embeddings ------------------------------------------------------------
def cached_text(conditioner, captions, dtype=torch.float32) -> dict:
    return {
        i: tuple(o.to(dtype) for o in conditioner.embedder_outputs(i, captions))
        for i in conditioner.text_embedder_indices()
    }


def test_cached_text_embeddings_give_the_computed_conditioning(tiny):
    conditioner = tiny.conditioner
    batch = tiny_batch(4)
    sizes = {k: v for k, v in batch.items() if k != "txt"}
    computed = conditioner(batch)
    assert conditioner.text_embedder_indices() == [0, 1]
    exact = conditioner({**sizes, "cached_embeddings": cached_text(conditioner, batch["txt"])})
    assert all(torch.equal(exact[k], computed[k]) for k in ("crossattn", "vector"))
    half = conditioner({**sizes, "cached_embeddings": cached_text(conditioner, batch["txt"], torch.float16)})
    for key in ("crossattn", "vector"):
        assert half[key].dtype == torch.float32 and not torch.equal(half[key], computed[key])  # fp16 rounded
        torch.testing.assert_close(half[key], computed[key], rtol=2e-3, atol=2e-3)
    wrong = {0: (torch.zeros(4, 77, 31),), 1: cached_text(conditioner, batch["txt"])[1]}
    with pytest.raises(ValueError, match=r"cached_embeddings\[0\] .* another model config"):
        conditioner({**sizes, "cached_embeddings": wrong})


def test_dropout_with_cached_embeddings_equals_live_dropout(tiny):
    """Same generator, same draws: per-embedder zeroing and caption dropout to "" both match."""
    conditioner = tiny.conditioner
    batch = tiny_batch(8)
    sizes = {k: v for k, v in batch.items() if k != "txt"}
    cached = {**sizes, "cached_embeddings": cached_text(conditioner, batch["txt"])}
    old = list(conditioner.ucg_rates)
    try:
        conditioner.ucg_rates, conditioner.caption_dropout_rate = [0.3, 0.3, 0.0, 0.0, 0.0], 0.4
        live = conditioner(batch, apply_dropout=True, generator=torch.Generator().manual_seed(4))
        got = conditioner(cached, apply_dropout=True, generator=torch.Generator().manual_seed(4))
    finally:
        conditioner.ucg_rates, conditioner.caption_dropout_rate = old, 0.0
    full = conditioner(batch)
    changed = [i for i in range(8) if not torch.allclose(live["crossattn"][i], full["crossattn"][i])]
    assert 0 < len(changed) < 8
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(got[key], live[key], rtol=1e-5, atol=1e-6)


def test_caption_dropout_without_loaded_encoders_uses_the_stored_empty_caption(tiny):
    with torch.device("meta"):
        unloaded = build_model("tiny").conditioner
    batch = tiny_batch(2)
    sizes = {k: v for k, v in batch.items() if k != "txt"}
    cached = {**sizes, "cached_embeddings": cached_text(tiny.conditioner, batch["txt"])}
    unloaded.caption_dropout_rate = 1.0
    with pytest.raises(RuntimeError, match="weights are not loaded"):
        unloaded(cached, apply_dropout=True)
    empty = {i: tuple(o[0] for o in tiny.conditioner.embedder_outputs(i, [""])) for i in (0, 1)}
    unloaded.set_empty_caption_outputs(empty)
    dropped = unloaded(cached, apply_dropout=True)
    want = tiny.conditioner({**batch, "txt": ["", ""]})
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(dropped[key], want[key], rtol=1e-5, atol=1e-6)

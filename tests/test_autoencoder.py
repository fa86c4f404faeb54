"""The VAE: official layout and size, shapes, dtype policy, posterior, and fidelity to diffusers."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import randomize_

from sgm.models.autoencoder import AutoencoderKL, DiagonalGaussian

VAE_PREFIX = "first_stage_model."
TINY = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4, "norm_num_groups": 8}


def tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**{**TINY, **overrides}), seed=seed).eval()


def images(batch: int = 2, height: int = 16, width: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def sdxl_vae() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL()


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("reference", ["base_reference", "refiner_reference"])
def test_sdxl_vae_keys_and_shapes_equal_the_official_file(sdxl_vae, reference, request):
    official = {k: v for k, v in request.getfixturevalue(reference).items() if k.startswith(VAE_PREFIX)}
    ours = {VAE_PREFIX + k: tuple(v.shape) for k, v in sdxl_vae.state_dict().items()}
    assert len(official) == 248
    assert ours == official


def test_sdxl_vae_parameter_counts(sdxl_vae):
    assert _numel(sdxl_vae) == 83_653_863
    assert _numel(sdxl_vae.encoder) == 34_163_592
    assert _numel(sdxl_vae.decoder) == 49_490_179
    assert _numel(sdxl_vae.quant_conv) + _numel(sdxl_vae.post_quant_conv) == 92
    assert sdxl_vae.downsampling_factor == 8
    assert all(p.device.type == "meta" for p in sdxl_vae.parameters())


@pytest.mark.parametrize("ch_mult", [(1, 2), (1, 2, 2)])
def test_tiny_vae_shapes(ch_mult):
    vae = tiny_vae(ch_mult=ch_mult)
    f = 2 ** (len(ch_mult) - 1)
    x = images(height=8 * f, width=4 * f)
    with torch.no_grad():
        posterior = vae.encode(x)
        out = vae.decode(posterior.sample())
    assert vae.downsampling_factor == f
    assert posterior.mean.shape == posterior.logvar.shape == posterior.std.shape == (2, 4, 8, 4)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_encode_and_decode_reject_wrong_shapes():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(images(height=15))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="unscaled latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_float16_is_refused_with_a_clear_message():
    vae = tiny_vae()
    half_input = images().half()
    with torch.no_grad():  # float16 inputs are upcast: the VAE itself never computes in fp16
        upcast = vae.encode(half_input).mean
        reference = vae.encode(half_input.float()).mean
    assert upcast.dtype == torch.float32 and torch.equal(upcast, reference)
    vae.half()
    with pytest.raises(ValueError, match="the SDXL VAE overflows in fp16; keep it in float32 or bfloat16"):
        vae.encode(images().float())
    with pytest.raises(ValueError, match="parameters are float16"):
        vae.encode(images())
    with pytest.raises(ValueError, match="parameters are float16"):
        vae.decode(torch.zeros(1, 4, 4, 4))


def test_bfloat16_runs_and_stays_close_to_float32():
    vae = tiny_vae()
    x = images()
    with torch.no_grad():
        reference = vae.decode(vae.encode(x).mode())
        vae.bfloat16()
        posterior = vae.encode(x)  # float32 input is cast to the VAE's dtype
        out = vae.decode(posterior.mode())
    assert posterior.mean.dtype == out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.1)


def test_autocast_is_disabled_inside_the_vae():
    vae = tiny_vae()
    x = images()
    with torch.no_grad():
        plain = vae.decode(vae.encode(x).mean)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x)
            under_autocast = vae.decode(posterior.mean)
    assert posterior.mean.dtype == under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, atol=0, rtol=0)


def test_posterior_sampling_is_seeded_and_mode_is_the_mean():
    with torch.no_grad():
        posterior = tiny_vae().encode(images())

    def draw(seed: int) -> torch.Tensor:
        return posterior.sample(generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(posterior.mode(), posterior.mean)
    noise = (draw(0) - posterior.mean) / posterior.std
    assert noise.std().item() == pytest.approx(1.0, abs=0.2)


def test_posterior_clamps_logvar():
    mean = torch.zeros(1, 4, 2, 2)
    logvar = torch.tensor([-100.0, -1.0, 5.0, 100.0]).reshape(1, 4, 1, 1).expand(1, 4, 2, 2)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert posterior.logvar[0, :, 0, 0].tolist() == [-30.0, -1.0, 5.0, 20.0]
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))


def _diffusers_config(ch: int, ch_mult, num_res_blocks: int, z_channels: int, norm_num_groups: int, **_) -> dict:
    levels = len(ch_mult)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": num_res_blocks,
        "latent_channels": z_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": 32,
    }


def test_matches_diffusers_autoencoder_kl_in_float32():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = tiny_vae(seed=3)
    config = _diffusers_config(**TINY)
    checkpoint = {VAE_PREFIX + k: v.clone() for k, v in vae.state_dict().items()}
    reference = DiffusersAutoencoderKL(**config).eval()
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    reference.load_state_dict(converted, strict=True)

    x = images(height=16, width=24, seed=5)
    with torch.no_grad():
        ours = vae.encode(x)
        theirs = reference.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.logvar, theirs.logvar, atol=1e-5, rtol=1e-5)
        z = ours.mean
        torch.testing.assert_close(vae.decode(z), reference.decode(z).sample, atol=1e-5, rtol=1e-5)

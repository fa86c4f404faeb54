"""Diffusion training pieces: the sigma table, denoiser scalings, weightings, noise levels, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling, VScaling
from sgm.diffusion.discretization import legacy_ddpm_sigmas, sampling_sigmas, sampling_timesteps
from sgm.diffusion.loss import DiffusionLoss
from sgm.diffusion.noise_levels import DiscreteTimestepSampler
from sgm.diffusion.weighting import EpsWeighting, MinSNRWeighting, UnitWeighting, VWeighting

SCALINGS = {"eps": EpsScaling, "v": VScaling}


def oracle_network(x0_of, prediction: str, table: torch.Tensor):
    """A network that predicts the eps or v of the DDPM state exactly, given how to find x0.

    Written from the DDPM relations (z = sqrt(abar) x0 + sqrt(1 - abar) eps, v = sqrt(abar) eps -
    sqrt(1 - abar) x0, abar = 1 / (1 + sigma^2)), independently of the denoiser's c_skip/c_out/c_in.
    `x0_of(x, sigma)` returns x0 for the sigma-form state x (the truth, or a posterior mean).
    """

    def network(z, timesteps, context=None, y=None):
        sigma = table.to(z.device)[timesteps.long()].view(-1, *([1] * (z.ndim - 1)))
        sqrt_abar = 1.0 / torch.sqrt(1.0 + sigma**2)
        sqrt_one_minus = sigma * sqrt_abar
        x = z / sqrt_abar
        x0 = x0_of(x, sigma)
        eps = (z - sqrt_abar * x0) / sqrt_one_minus
        return eps if prediction == "eps" else sqrt_abar * eps - sqrt_one_minus * x0

    return network


def _cond(batch: int) -> dict[str, torch.Tensor]:
    return {"crossattn": torch.zeros(batch, 77, 8), "vector": torch.zeros(batch, 16)}


# --- discretization -------------------------------------------------------------------------


def test_sigma_table_matches_spec_values():
    sigmas = legacy_ddpm_sigmas()
    assert sigmas.shape == (1000,) and sigmas.dtype == torch.float32
    for t, want in [(0, 0.029167), (199, 0.56928), (200, 0.57167), (999, 14.614641)]:
        assert sigmas[t].item() == pytest.approx(want, abs=5e-6), t
    assert torch.all(sigmas[1:] > sigmas[:-1])


def test_fifty_step_schedule():
    t = sampling_timesteps(50)
    assert t[0] == 19 and t[1] == 39 and t[-2] == 979 and t[-1] == 999 and len(t) == 50
    sigmas = sampling_sigmas(50)
    table = legacy_ddpm_sigmas()
    assert sigmas.shape == (51,)
    assert sigmas[0] == table[999] and sigmas[-2] == table[19] and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert torch.equal(sampling_sigmas(1000)[:-1], table.flip(0))


def test_schedule_rejects_impossible_step_counts():
    with pytest.raises(ValueError, match="num_steps"):
        sampling_sigmas(1001)
    with pytest.raises(ValueError, match="num_steps"):
        sampling_sigmas(0)


# --- denoiser -------------------------------------------------------------------------------


def test_sigma_index_round_trip_and_quantization():
    denoiser = DiscreteDenoiser(EpsScaling())
    idx = torch.arange(1000)
    assert torch.equal(denoiser.sigma_to_idx(denoiser.idx_to_sigma(idx)), idx)
    between = (denoiser.sigmas[10] * 0.7 + denoiser.sigmas[11] * 0.3).reshape(1)
    assert denoiser.sigma_to_idx(between).item() == 10
    assert "sigmas" in denoiser.state_dict()
    # The scalings use the snapped sigma too: F = 1 at x = 0 gives D = c_out = -sigma(10).
    out = denoiser(lambda z, t, context=None, y=None: torch.ones_like(z), torch.zeros(1, 1, 2, 2), between, {})
    torch.testing.assert_close(out, torch.full_like(out, -denoiser.sigmas[10].item()))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_oracle_network_recovers_x0(prediction):
    denoiser = DiscreteDenoiser(SCALINGS[prediction]())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=generator)
    noise = torch.randn(6, 4, 8, 8, generator=generator)
    sigma = denoiser.sigmas[torch.tensor([0, 1, 199, 500, 998, 999])]
    x = x0 + noise * sigma.view(-1, 1, 1, 1)
    network = oracle_network(lambda x, s: x0, prediction, denoiser.sigmas)
    torch.testing.assert_close(denoiser(network, x, sigma, _cond(6)), x0, atol=2e-4, rtol=1e-4)


def test_eps_denoiser_is_the_ddpm_x0_estimate():
    """For any network: input = DDPM state z_t, c_noise = t, and D = (z_t - sqrt(1-abar) eps) / sqrt(abar)."""
    torch.manual_seed(0)
    net = nn.Conv2d(4, 4, 3, padding=1)
    seen = {}

    def network(z, timesteps, context=None, y=None):
        seen["z"], seen["t"] = z, timesteps
        return net(z)

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = torch.from_numpy(np.cumprod(1 - betas))
    t = torch.tensor([3, 250, 999])
    x0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    a = abar[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps

    denoiser = DiscreteDenoiser(EpsScaling())
    x = (z_t / a.sqrt()).float()
    out = denoiser(network, x, denoiser.sigmas[t], _cond(3))
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["z"].double(), z_t, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ddpm = (z_t - (1 - a).sqrt() * net(z_t.float()).double()) / a.sqrt()
        torch.testing.assert_close(out.double(), ddpm, atol=1e-4, rtol=1e-4)


def test_denoiser_passes_conditioning_and_accepts_scalar_sigma():
    seen = {}

    def network(z, timesteps, context=None, y=None):
        seen.update(context=context, y=y, t=timesteps)
        return torch.zeros_like(z)

    cond = {"crossattn": torch.randn(2, 77, 8), "vector": torch.randn(2, 16)}
    DiscreteDenoiser(EpsScaling())(network, torch.randn(2, 4, 4, 4), 14.6, cond)
    assert seen["context"] is cond["crossattn"] and seen["y"] is cond["vector"]
    assert seen["t"].tolist() == [999, 999] and seen["t"].dtype == torch.int64


def test_unquantized_denoiser_gives_fractional_timesteps():
    denoiser = DiscreteDenoiser(EpsScaling(), quantize=False)
    table = denoiser.sigmas
    assert torch.allclose(denoiser.sigma_to_t(table[[0, 7, 999]]), torch.tensor([0.0, 7.0, 999.0]), atol=1e-3)
    mid = (table[100].log() * 0.25 + table[101].log() * 0.75).exp().reshape(1)
    assert denoiser.sigma_to_t(mid).item() == pytest.approx(100.75, abs=1e-3)
    seen = {}

    def network(z, timesteps, context=None, y=None):
        seen["t"] = timesteps
        return torch.ones_like(z)

    out = denoiser(network, torch.zeros(1, 1, 2, 2), mid, {})
    assert seen["t"].item() == pytest.approx(100.75, abs=1e-3)
    torch.testing.assert_close(out, torch.full_like(out, -mid.item()))  # c_out uses the unsnapped sigma


# --- weightings -----------------------------------------------------------------------------


def _errors(prediction: str):
    """x0-space squared error and the network-space (eps or v) squared error for random outputs."""
    generator = torch.Generator().manual_seed(1)
    denoiser = DiscreteDenoiser(SCALINGS[prediction]())
    sigma = denoiser.sigmas[torch.tensor([0, 50, 300, 700, 999])]
    s = sigma.view(-1, 1, 1, 1)
    x0, eps = torch.randn(5, 4, 8, 8, generator=generator), torch.randn(5, 4, 8, 8, generator=generator)
    prediction_out = torch.randn(5, 4, 8, 8, generator=generator)
    sqrt_abar, sqrt_one_minus = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    target = eps if prediction == "eps" else sqrt_abar * eps - sqrt_one_minus * x0
    denoised = denoiser(lambda z, t, context=None, y=None: prediction_out, x0 + s * eps, sigma, {})
    x0_mse = ((denoised - x0) ** 2).flatten(1).mean(1)
    net_mse = ((prediction_out - target) ** 2).flatten(1).mean(1)
    return sigma, x0_mse, net_mse


def test_eps_weighting_gives_eps_mse():
    sigma, x0_mse, eps_mse = _errors("eps")
    torch.testing.assert_close(EpsWeighting()(sigma) * x0_mse, eps_mse, rtol=1e-4, atol=1e-6)


def test_v_weighting_gives_v_mse():
    sigma, x0_mse, v_mse = _errors("v")
    torch.testing.assert_close(VWeighting()(sigma) * x0_mse, v_mse, rtol=1e-4, atol=1e-6)


def test_unit_weighting():
    sigma = torch.tensor([0.1, 3.0])
    assert torch.equal(UnitWeighting()(sigma), torch.ones(2))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting_matches_hang_et_al(prediction):
    sigma, x0_mse, net_mse = _errors(prediction)
    snr = sigma**-2
    gamma = 5.0
    factor = snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(MinSNRWeighting(gamma)(sigma) * x0_mse, factor * net_mse, rtol=1e-4, atol=1e-6)
    # Clipped at high SNR (low noise), untouched where SNR < gamma.
    assert MinSNRWeighting(gamma)(torch.tensor([0.03])).item() == pytest.approx(gamma)
    assert MinSNRWeighting(gamma)(torch.tensor([2.0])).item() == pytest.approx(0.25)


# --- noise levels ---------------------------------------------------------------------------


def test_timestep_sampler_is_uniform_over_full_range():
    sampler = DiscreteTimestepSampler()
    sigmas, idx = sampler(40000, generator=torch.Generator().manual_seed(0))
    assert idx.min() == 0 and idx.max() == 999 and idx.dtype == torch.int64
    assert torch.equal(sigmas, legacy_ddpm_sigmas()[idx])
    counts = torch.bincount(idx // 100, minlength=10).float()
    assert torch.all((counts - 4000).abs() < 4 * math.sqrt(4000 * 0.9))


def test_refiner_sampler_truncates_to_lowest_200_steps():
    sampler = DiscreteTimestepSampler(t_max=199)
    sigmas, idx = sampler(20000, generator=torch.Generator().manual_seed(1))
    assert idx.min() == 0 and idx.max() == 199
    assert sigmas.max().item() == pytest.approx(0.56928, abs=1e-5)
    counts = torch.bincount(idx // 20, minlength=10).float()
    assert counts.shape == (10,) and torch.all((counts - 2000).abs() < 4 * math.sqrt(2000 * 0.9))


def test_timestep_sampler_is_deterministic_and_rejects_bad_ranges():
    sampler = DiscreteTimestepSampler(t_min=10, t_max=20)
    a = sampler(64, generator=torch.Generator().manual_seed(3))
    b = sampler(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[1], b[1]) and a[1].min() >= 10 and a[1].max() <= 20
    with pytest.raises(ValueError, match="t_max=199"):
        DiscreteTimestepSampler(t_max=1000)
    with pytest.raises(ValueError, match="t_min"):
        DiscreteTimestepSampler(t_min=50, t_max=10)


# --- loss -----------------------------------------------------------------------------------


def _loss(prediction="eps", **kwargs) -> DiffusionLoss:
    weighting = kwargs.pop("weighting", EpsWeighting())
    sampler = kwargs.pop("sampler", DiscreteTimestepSampler())
    return DiffusionLoss(DiscreteDenoiser(SCALINGS[prediction]()), sampler, weighting, **kwargs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_oracle_network_has_zero_loss(prediction, offset):
    loss_fn = _loss(prediction, weighting=UnitWeighting(), offset_noise_level=offset)
    x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    network = oracle_network(lambda x, s: x0, prediction, loss_fn.denoiser.sigmas)
    loss = loss_fn(network, x0, _cond(8), generator=torch.Generator().manual_seed(1))
    assert loss.shape == (8,) and loss.max().item() < 1e-8


def test_eps_loss_equals_eps_mse_of_a_constant_network():
    """A network predicting 0 has eps-MSE = E[n^2]: about 1 per sample under EpsWeighting."""
    loss_fn = _loss()
    x0 = torch.randn(16, 4, 32, 32)
    loss = loss_fn(
        lambda z, t, context=None, y=None: torch.zeros_like(z), x0, _cond(16), torch.Generator().manual_seed(0)
    )
    assert torch.allclose(loss, torch.ones(16), atol=0.1)


def _captured_noise(loss_fn: DiffusionLoss, x0: torch.Tensor, seed: int = 0):
    """The noise n of x_n = x0 + sigma n, read back from what the network receives."""
    seen = {}

    def network(z, timesteps, context=None, y=None):
        sigma = loss_fn.denoiser.sigmas[timesteps].view(-1, 1, 1, 1)
        seen["noise"] = (z * torch.sqrt(1 + sigma**2) - x0) / sigma
        seen["t"] = timesteps
        return torch.zeros_like(z)

    loss_fn(network, x0, _cond(x0.shape[0]), generator=torch.Generator().manual_seed(seed))
    return seen


def test_offset_noise_per_sample_and_per_channel():
    x0 = torch.zeros(64, 4, 32, 32)
    plain = _captured_noise(_loss(), x0)["noise"].mean(dim=(2, 3))
    per_sample = _captured_noise(_loss(offset_noise_level=1.0), x0)["noise"].mean(dim=(2, 3))
    per_channel = _captured_noise(_loss(offset_noise_level=1.0, offset_noise_per_channel=True), x0)["noise"].mean(
        dim=(2, 3)
    )
    # Plain noise: channel means ~ N(0, 1/1024). Offset: each sample (or each channel) shifted by N(0, 1).
    assert plain.std() < 0.06
    assert 0.7 < per_sample.mean(1).std() < 1.3 and (per_sample - per_sample.mean(1, keepdim=True)).abs().max() < 0.2
    within = (per_channel - per_channel.mean(1, keepdim=True)).std()
    assert 0.6 < within < 1.3


def test_offset_noise_shapes():
    latents = torch.zeros(3, 4, 5, 6)
    generator = torch.Generator().manual_seed(0)
    noise = _loss(offset_noise_level=0.05).sample_noise(latents, generator)
    assert noise.shape == latents.shape
    with pytest.raises(ValueError, match="offset_noise_level"):
        _loss(offset_noise_level=-0.1)


def test_refiner_loss_only_sees_low_noise_steps():
    loss_fn = _loss(sampler=DiscreteTimestepSampler(t_max=199))
    t = _captured_noise(loss_fn, torch.zeros(512, 1, 2, 2))["t"]
    assert t.max() <= 199 and t.max() > 150 and t.min() < 50


def test_loss_is_deterministic_with_a_seeded_generator():
    torch.manual_seed(0)
    net = nn.Conv2d(4, 4, 3, padding=1)
    network = lambda z, t, context=None, y=None: net(z)  # noqa: E731
    loss_fn = _loss(offset_noise_level=0.05)
    x0 = torch.randn(4, 4, 8, 8)
    a = loss_fn(network, x0, _cond(4), torch.Generator().manual_seed(5))
    b = loss_fn(network, x0, _cond(4), torch.Generator().manual_seed(5))
    c = loss_fn(network, x0, _cond(4), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.mean().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0

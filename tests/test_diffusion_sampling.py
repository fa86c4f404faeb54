"""Diffusion inference pieces: samplers, classifier-free guidance, img2img and the base -> refiner handoff.

Correctness is checked with the ideal denoiser of Gaussian data x0 ~ N(mu, s^2) per pixel, whose
posterior mean E[x0 | x0 + sigma n = x] = mu + s^2 / (s^2 + sigma^2) (x - mu) is closed form; the
probability-flow ODE then has the exact solution x(sigma) - mu ∝ sqrt(s^2 + sigma^2).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion_training import oracle_network
from torch import nn

from sgm.diffusion.denoiser import DiscreteDenoiser, EpsScaling, VScaling
from sgm.diffusion.discretization import legacy_ddpm_sigmas, sampling_sigmas, sampling_timesteps
from sgm.diffusion.guidance import ClassifierFreeGuidance, NoGuidance
from sgm.diffusion.img2img import denoising_end_sigmas, img2img_sigmas, noise_latents
from sgm.diffusion.samplers import DPMPP2MSampler, EulerEDMSampler
from sgm.diffusion.sampling import sample

MU, STD = 0.5, 1.0
SAMPLERS = {"euler": EulerEDMSampler, "dpmpp2m": DPMPP2MSampler}


def ideal_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Posterior mean of x0 ~ N(MU, STD^2) given x = x0 + sigma n; sigma broadcasts against x."""
    return MU + STD**2 / (STD**2 + sigma**2) * (x - MU)


def ideal_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return ideal_x0(x, sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype))


def exact_ode(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    return MU + (x_start - MU) * math.sqrt(STD**2 + sigma_end**2) / math.sqrt(STD**2 + sigma_start**2)


def _cond(batch: int, value: float = 0.0) -> dict[str, torch.Tensor]:
    return {"crossattn": torch.full((batch, 77, 8), value), "vector": torch.full((batch, 16), value)}


def _noise(shape=(8, 1, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- samplers against the Gaussian ideal denoiser --------------------------------------------


@pytest.mark.parametrize("name", ["euler", "dpmpp2m"])
@pytest.mark.parametrize("num_steps", [30, 50])
def test_samplers_reach_the_data_distribution(name, num_steps):
    """Through the real denoiser and an eps-predicting oracle network, as in SDXL inference."""
    denoiser = DiscreteDenoiser(EpsScaling())
    network = oracle_network(ideal_x0, "eps", denoiser.sigmas)
    out = sample(
        network,
        denoiser,
        _cond(8),
        None,
        (8, 1, 32, 32),
        SAMPLERS[name](num_steps),
        1.0,
        torch.Generator().manual_seed(0),
    )
    # Euler is first order: at 30-50 steps its samples are ~5% narrower than the data; DPM++ 2M ~2%.
    std_tol = 0.08 if name == "euler" else 0.035
    assert out.mean().item() == pytest.approx(MU, abs=0.07)
    assert out.std().item() == pytest.approx(STD, rel=std_tol)


@pytest.mark.parametrize("name", ["euler", "dpmpp2m"])
def test_samplers_converge_with_their_order(name):
    """On a fixed geometric grid, doubling the steps halves Euler's error and quarters DPM++ 2M's."""
    x_start = _noise((4, 1, 16, 16)).double() * 14.6
    sampler = SAMPLERS[name]()
    errors = []
    for steps in (16, 32, 64):
        sigmas = torch.logspace(math.log10(14.6), math.log10(0.03), steps + 1, dtype=torch.float64)
        out = sampler.integrate(ideal_denoise, x_start.clone(), sigmas)
        errors.append((out - exact_ode(x_start, 14.6, 0.03)).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    low, high = (1.7, 2.3) if name == "euler" else (3.4, 4.6)
    assert all(low < r < high for r in ratios), (errors, ratios)
    assert errors[-1] < (0.12 if name == "euler" else 3e-3)  # outputs are ~N(0.5, 1)


def test_euler_matches_diffusers_reference():
    from diffusers import EulerDiscreteScheduler

    sigmas = sampling_sigmas(30)
    noise = _noise((2, 1, 8, 8))
    ours = EulerEDMSampler(30)(ideal_denoise, noise)

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    x = noise * math.sqrt(1 + sigmas[0].item() ** 2)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].item()
        eps = (x - ideal_x0(x, torch.tensor(sigma))) / sigma  # what an eps network would predict
        assert scheduler.scale_model_input(x, t).shape == x.shape
        x = scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_dpmpp2m_matches_diffusers_reference():
    from diffusers import DPMSolverMultistepScheduler

    noise = _noise((2, 1, 8, 8))
    ours = DPMPP2MSampler(30)(ideal_denoise, noise)

    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=sampling_timesteps(30)[::-1].tolist())
    z = noise.clone()  # the DDPM state; ours starts at x_T = noise * sqrt(1 + sigma_max^2), the same point
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].item()
        x = z * math.sqrt(1 + sigma**2)
        eps = (x - ideal_x0(x, torch.tensor(sigma))) / sigma
        z = scheduler.step(eps, t, z).prev_sample
    torch.testing.assert_close(ours, z, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["euler", "dpmpp2m"])
def test_v_prediction_end_to_end_matches_eps(name):
    """The same ideal denoiser, reached through a v-predicting network, samples the same latents."""
    results = []
    for prediction, scaling in (("eps", EpsScaling()), ("v", VScaling())):
        denoiser = DiscreteDenoiser(scaling)
        network = oracle_network(ideal_x0, prediction, denoiser.sigmas)
        results.append(
            sample(
                network,
                denoiser,
                _cond(2),
                None,
                (2, 1, 8, 8),
                SAMPLERS[name](20),
                1.0,
                torch.Generator().manual_seed(0),
            )
        )
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_euler_churn_is_stochastic_but_seeded():
    sampler = EulerEDMSampler(20, s_churn=10.0)
    noise = _noise((2, 1, 8, 8))
    a = sampler(ideal_denoise, noise, generator=torch.Generator().manual_seed(1))
    b = sampler(ideal_denoise, noise, generator=torch.Generator().manual_seed(1))
    c = sampler(ideal_denoise, noise, generator=torch.Generator().manual_seed(2))
    plain = EulerEDMSampler(20)(ideal_denoise, noise)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, plain)
    # Churn limited to a sigma window leaves the rest deterministic: an empty window is plain Euler.
    assert torch.equal(EulerEDMSampler(20, s_churn=10.0, s_tmin=100.0)(ideal_denoise, noise), plain)


def test_sampler_calls_denoise_with_the_schedule():
    seen = []

    def denoise(x, sigma):
        seen.append(sigma)
        return torch.zeros_like(x)

    sigmas = sampling_sigmas(10)
    EulerEDMSampler(10)(denoise, torch.zeros(3, 1, 2, 2))
    assert len(seen) == 10 and all(s.shape == (3,) and s.dtype == torch.float32 for s in seen)
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), sigmas[:-1])


# --- guidance -------------------------------------------------------------------------------


class ContextNet(nn.Module):
    """A toy network whose output depends on x, t, the context and y."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.ctx = nn.Linear(8, 1)
        self.vec = nn.Linear(16, 1)
        self.calls = []

    def forward(self, z, timesteps, context=None, y=None):
        self.calls.append((z.shape[0], context, y))
        shift = self.ctx(context.mean(1)) + self.vec(y) + timesteps.float()[:, None] / 1000
        return self.conv(z) + shift.view(-1, 1, 1, 1)


def _conds(batch=2):
    generator = torch.Generator().manual_seed(4)
    cond = {
        "crossattn": torch.randn(batch, 77, 8, generator=generator),
        "vector": torch.randn(batch, 16, generator=generator),
    }
    uncond = {"crossattn": torch.zeros(batch, 77, 8), "vector": torch.randn(batch, 16, generator=generator)}
    return cond, uncond


def test_cfg_combines_one_batched_forward_uncond_first():
    net, denoiser = ContextNet(), DiscreteDenoiser(EpsScaling())
    cond, uncond = _conds()
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 3.0)
    with torch.no_grad():
        guided = ClassifierFreeGuidance(7.5)(denoiser, net, cond, uncond)(x, sigma)
        assert len(net.calls) == 1 and net.calls[0][0] == 4
        _, context, y = net.calls[0]
        assert torch.equal(context[:2], uncond["crossattn"]) and torch.equal(y[2:], cond["vector"])
        d_c = denoiser(net, x, sigma, cond)
        d_u = denoiser(net, x, sigma, uncond)
    torch.testing.assert_close(guided, d_u + 7.5 * (d_c - d_u))


def test_cfg_scale_one_is_the_conditional_result():
    net, denoiser = ContextNet(), DiscreteDenoiser(EpsScaling())
    cond, uncond = _conds()
    with torch.no_grad():
        a = sample(net, denoiser, cond, uncond, (2, 1, 8, 8), DPMPP2MSampler(8), 1.0, torch.Generator().manual_seed(0))
        assert all(batch == 2 for batch, _, _ in net.calls)  # the unconditional half is skipped
        b = DPMPP2MSampler(8)(NoGuidance()(denoiser, net, cond), _noise((2, 1, 8, 8)))
    assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.0, 5.0, 7.5])
def test_cfg_with_uncond_equal_to_cond_is_the_conditional_result(scale):
    net, denoiser = ContextNet(), DiscreteDenoiser(EpsScaling())
    cond, _ = _conds()
    with torch.no_grad():
        guided = sample(
            net, denoiser, cond, cond, (2, 1, 8, 8), EulerEDMSampler(8), scale, torch.Generator().manual_seed(0)
        )
        plain = sample(
            net, denoiser, cond, None, (2, 1, 8, 8), EulerEDMSampler(8), 1.0, torch.Generator().manual_seed(0)
        )
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-5)


def test_cfg_errors_name_the_fix():
    denoiser = DiscreteDenoiser(EpsScaling())
    cond, uncond = _conds()
    with pytest.raises(ValueError, match="pass uncond"):
        ClassifierFreeGuidance(5.0)(denoiser, ContextNet(), cond, None)
    with pytest.raises(ValueError, match="same keys"):
        ClassifierFreeGuidance(5.0)(denoiser, ContextNet(), cond, {"crossattn": uncond["crossattn"]})


# --- img2img and the base -> refiner handoff ------------------------------------------------


def test_img2img_schedule_for_refiner_strength():
    sigmas = sampling_sigmas(50)
    tail = img2img_sigmas(sigmas, 0.15)
    assert len(tail) - 1 == 6 and tail[-1] == 0
    assert round(tail[0].item(), 4) == 0.3866 and tail[0] == legacy_ddpm_sigmas()[119]
    head = denoising_end_sigmas(sigmas, 0.15)
    assert len(head) - 1 == 44 and head[-1] == tail[0] and head[0] == sigmas[0]
    assert torch.equal(img2img_sigmas(sigmas, 1.0), sigmas)
    assert torch.equal(img2img_sigmas(sigmas, 0.0), sigmas[-1:])  # nothing to run
    assert torch.equal(denoising_end_sigmas(sigmas, 0.0), sigmas)
    with pytest.raises(ValueError, match="strength"):
        img2img_sigmas(sigmas, 1.5)


def test_img2img_starts_from_latents_plus_sigma_noise():
    """SDEdit start z + sigma * n, without txt2img's sqrt(1 + sigma^2) factor."""
    seen = []

    def network(z, timesteps, context=None, y=None):
        seen.append((z, timesteps))
        return torch.zeros_like(z)

    denoiser = DiscreteDenoiser(EpsScaling())
    init = torch.randn(2, 4, 8, 8)
    sample(
        network,
        denoiser,
        _cond(2),
        None,
        init.shape,
        EulerEDMSampler(50),
        1.0,
        torch.Generator().manual_seed(3),
        init_latents=init,
        strength=0.15,
    )
    z, t = seen[0]
    assert len(seen) == 6 and t.tolist() == [119, 119]
    sigma = legacy_ddpm_sigmas()[119].item()
    expected = noise_latents(init, _noise(init.shape, seed=3), sigma)
    torch.testing.assert_close(z * math.sqrt(1 + sigma**2), expected, atol=1e-5, rtol=1e-5)


def test_img2img_with_ideal_denoiser_keeps_the_data_distribution():
    denoiser = DiscreteDenoiser(EpsScaling())
    network = oracle_network(ideal_x0, "eps", denoiser.sigmas)
    init = MU + STD * _noise((8, 1, 32, 32), seed=9)
    out = sample(
        network,
        denoiser,
        _cond(8),
        None,
        init.shape,
        DPMPP2MSampler(50),
        1.0,
        torch.Generator().manual_seed(0),
        init_latents=init,
        strength=0.3,
    )
    assert out.mean().item() == pytest.approx(MU, abs=0.05) and out.std().item() == pytest.approx(STD, rel=0.03)
    corr = torch.corrcoef(torch.stack([out.flatten(), init.flatten()]))[0, 1]
    assert 0.5 < corr < 0.99  # an edit of the input, not a copy and not a fresh sample


def test_base_stops_early_and_refiner_finishes_like_one_run():
    """Euler (deterministic) base to sigma 0.3866 + 6 refiner steps = the full 50-step run."""
    denoiser = DiscreteDenoiser(EpsScaling())
    net = ContextNet()
    cond, uncond = _conds()
    args = (net, denoiser, cond, uncond, (2, 1, 8, 8), EulerEDMSampler(50), 5.0)
    with torch.no_grad():
        full = sample(*args, torch.Generator().manual_seed(0))
        net.calls.clear()
        handoff = sample(*args, torch.Generator().manual_seed(0), refiner_strength=0.15)
        assert len(net.calls) == 44
        refined = sample(*args, torch.Generator().manual_seed(1), init_latents=handoff, strength=0.15, add_noise=False)
    assert not torch.allclose(handoff, full, atol=1e-2)  # still noisy at the handoff
    torch.testing.assert_close(refined, full, atol=1e-5, rtol=1e-5)


# --- the top-level sample -------------------------------------------------------------------


def test_sample_is_deterministic_with_a_seeded_generator():
    denoiser = DiscreteDenoiser(EpsScaling())
    net = ContextNet()
    cond, uncond = _conds()
    with torch.no_grad():
        runs = [
            sample(net, denoiser, cond, uncond, (2, 1, 8, 8), DPMPP2MSampler(10), 6.0, torch.Generator().manual_seed(s))
            for s in (0, 0, 1)
        ]
    assert runs[0].shape == (2, 1, 8, 8) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_sample_argument_errors():
    denoiser = DiscreteDenoiser(EpsScaling())
    args = (ContextNet(), denoiser, _conds()[0], None, (2, 1, 8, 8), EulerEDMSampler(4), 1.0)
    with pytest.raises(ValueError, match="pass init_latents"):
        sample(*args, strength=0.5)
    with pytest.raises(ValueError, match="pass strength"):
        sample(*args, init_latents=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        sample(*args, init_latents=torch.zeros(1, 1, 8, 8), strength=0.5)
    with pytest.raises(ValueError, match="txt2img only"):
        sample(*args, init_latents=torch.zeros(2, 1, 8, 8), strength=0.5, refiner_strength=0.15)

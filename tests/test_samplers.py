"""Samplers driven by the exact ε-predictor for Gaussian data must reproduce the data."""

import pytest
import torch

from diffusion import schedules
from diffusion.analytic import GaussianEpsOracle
from diffusion.process import GaussianDiffusion
from diffusion.samplers import Step, ddpm_ancestral

MU, S = 0.4, 0.3  # data ~ N(0.4, 0.3²), well inside [-1, 1]
N = 20_000


def exact_output_moments(schedule, T, variance):
    """Mean and std of Algorithm 2's output under ε*, by the linear-Gaussian recursion (float64).

    With ε* linear in x_t, each step is x_{t-1} = A_t x_t + c_t + σ_t z, so the moments follow
    m ← A m + c, v ← A² v + σ², from x_T ~ N(0, 1).
    """
    beta = schedule(T)
    alpha = 1 - beta
    ab = torch.cumprod(alpha, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    m, v = 0.0, 1.0
    for t in reversed(range(T)):
        k = (1 - ab[t]).sqrt() / (ab[t] * S**2 + 1 - ab[t])  # ε* = k (x_t - √ᾱ μ)
        sra, srm1 = ab[t].rsqrt(), (1 / ab[t] - 1).sqrt()
        coef_x0 = beta[t] * ab_prev[t].sqrt() / (1 - ab[t])
        coef_xt = (1 - ab_prev[t]) * alpha[t].sqrt() / (1 - ab[t])
        A = coef_x0 * (sra - srm1 * k) + coef_xt
        c = coef_x0 * srm1 * k * ab[t].sqrt() * MU
        var = beta[t] if variance == "beta" else (1 - ab_prev[t]) / (1 - ab[t]) * beta[t]
        m, v = A * m + c, A**2 * v + (var if t > 0 else 0.0)
    return float(m), float(v) ** 0.5


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize(
    "schedule,T", [(schedules.linear, 1000), (schedules.cosine, 1000), (schedules.linear, 100)]
)
def test_ancestral_sampling_reproduces_gaussian_data(variance, schedule, T):
    process = GaussianDiffusion(schedule(T))
    oracle = GaussianEpsOracle(process, MU, S)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, 1, 2, 2, generator=g)
    x0 = ddpm_ancestral(oracle, x_T, process, variance=variance, clip_x0=False, generator=g)
    # 1) the implementation: empirical moments of 80k values match the chain's exact moments
    #    (standard errors: 0.001 for the mean, 0.25 % for the std).
    exact_mean, exact_std = exact_output_moments(schedule, T, variance)
    assert x0.mean().item() == pytest.approx(exact_mean, abs=0.005)
    assert x0.std().item() == pytest.approx(exact_std, rel=0.015)
    # 2) the method: at T = 1000 the chain reproduces the data within 2 %; at T = 100 the two
    #    choices of σ² bracket it (Ho et al. Sec. 3.2: β and β̃ are the upper and lower extremes).
    assert exact_mean == pytest.approx(MU, abs=1e-3)
    if T == 1000:
        assert exact_std == pytest.approx(S, rel=0.02)
    elif variance == "beta":
        assert S < exact_std < 1.05 * S
    else:
        assert 0.85 * S < exact_std < S


def test_same_seed_same_samples_and_callback_sees_every_step():
    process = GaussianDiffusion(schedules.linear(20))
    oracle = GaussianEpsOracle(process, MU, S)
    steps: list[Step] = []
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    a = ddpm_ancestral(
        oracle, x_T, process, generator=torch.Generator().manual_seed(1), callback=steps.append
    )
    b = ddpm_ancestral(oracle, x_T, process, generator=torch.Generator().manual_seed(1))
    c = ddpm_ancestral(oracle, x_T, process, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [s.t for s in steps] == list(range(19, -1, -1))
    assert [s.nfe for s in steps] == list(range(1, 21))
    assert torch.equal(steps[-1].x_next, a)


def test_no_noise_at_the_last_step():
    """At t = 0 the sampler returns the posterior mean: the result does not depend on the noise."""
    process = GaussianDiffusion(schedules.linear(1))  # a single step: t = 0 only
    oracle = GaussianEpsOracle(process, MU, S)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = ddpm_ancestral(oracle, x_T, process, generator=torch.Generator().manual_seed(1))
    b = ddpm_ancestral(oracle, x_T, process, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    t = torch.zeros(8, dtype=torch.long)
    expected = process.x0_from_eps(x_T, t, oracle(x_T, t)).clamp(-1, 1)
    assert torch.allclose(a, expected, atol=1e-6)


# ----- fast samplers ---------------------------------------------------------------------------
from diffusion.samplers import ddim, ddim_encode, dpm_solver, respace  # noqa: E402


def gaussian_setup(T: int = 1000, schedule=schedules.linear):
    process = GaussianDiffusion(schedule(T))
    x_T = torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    return process, GaussianEpsOracle(process, MU, S), x_T


@pytest.mark.parametrize(
    "sampler,options,tol",
    [
        (ddim, {"steps": 1000, "eta": 0.0}, 0.02),  # the probability-flow ODE, finely
        (ddim, {"steps": 1000, "eta": 1.0}, 0.02),  # = DDPM with β̃
        (ddim, {"steps": 500, "eta": 0.5, "spacing": "trailing"}, 0.03),
        (dpm_solver, {"steps": 50}, 0.02),
        (ddpm_ancestral, {"steps": 100, "clip_x0": False}, 0.08),  # respaced, σ² = β: slightly wide
    ],
)
def test_fast_samplers_reproduce_gaussian_data(sampler, options, tol):
    process, oracle, x_T = gaussian_setup()
    nfe = []
    x0 = sampler(
        oracle,
        x_T,
        process,
        generator=torch.Generator().manual_seed(1),
        callback=lambda s: nfe.append(s.nfe),
        **options,
    )
    assert x0.mean().item() == pytest.approx(MU, abs=0.01)
    assert x0.std().item() == pytest.approx(S, rel=tol)
    assert nfe[-1] == options["steps"]  # every sampler reports its network evaluations


@pytest.mark.parametrize("schedule", [schedules.linear, schedules.cosine])
@pytest.mark.parametrize("spacing", ["logsnr", "trailing"])
def test_dpm_solver_beats_ddim_at_20_nfe(schedule, spacing):
    process, oracle, x_T = gaussian_setup(schedule=schedule)
    err_ddim = abs(ddim(oracle, x_T, process, steps=20, spacing=spacing).std().item() - S)
    err_dpm = abs(dpm_solver(oracle, x_T, process, steps=20, spacing=spacing).std().item() - S)
    assert err_dpm < err_ddim
    if spacing == "logsnr":
        assert err_dpm < 0.03 * S  # measured: 1.4 % (linear), 2.9 % (cosine)


def test_ddim_eta0_is_deterministic():
    process, oracle, x_T = gaussian_setup(T=100)
    a = ddim(oracle, x_T[:64], process, steps=10, generator=torch.Generator().manual_seed(1))
    b = ddim(oracle, x_T[:64], process, steps=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddim(
        oracle, x_T[:64], process, steps=10, eta=1.0, generator=torch.Generator().manual_seed(2)
    )
    assert not torch.equal(a, c)


def test_respacing_with_all_steps_is_plain_ddpm():
    process = GaussianDiffusion(schedules.cosine(50))
    oracle = GaussianEpsOracle(process, MU, S)
    same, index_map = respace(process, list(range(50)))
    assert torch.equal(index_map, torch.arange(50))
    assert torch.allclose(same.beta64, process.beta64, rtol=1e-10)
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    plain = ddpm_ancestral(oracle, x_T, process, generator=torch.Generator().manual_seed(1))
    mapped = ddpm_ancestral(
        lambda x, t: oracle(x, index_map[t]), x_T, same, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(plain, mapped, atol=1e-5)


def test_respaced_process_keeps_the_marginals():
    process = GaussianDiffusion(schedules.linear(1000))
    kept = [0, 10, 250, 999]
    short, index_map = respace(process, kept)
    assert short.T == 4 and index_map.tolist() == kept
    assert torch.allclose(short.alpha_bar, process.alpha_bar[kept], rtol=1e-6)


@pytest.mark.parametrize("steps,rms_tol", [(100, 0.03), (1000, 0.003)])
def test_ddim_encode_then_decode_returns_x0(steps, rms_tol):
    process, oracle, _ = gaussian_setup()
    x0 = MU + S * torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    x_T = ddim_encode(oracle, x0, process, steps=steps)
    assert x_T.std().item() == pytest.approx(1.0, abs=0.1)  # the encoding looks like the prior
    back = ddim(oracle, x_T, process, steps=steps)
    assert (back - x0).pow(2).mean().sqrt().item() < rms_tol

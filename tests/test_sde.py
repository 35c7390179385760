"""Score SDEs and NCSN against closed forms; every score-based sampler, driven by the exact
score of Gaussian data, reproduces the data's mean and standard deviation."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion import samplers as S
from diffusion.evaluation.ode_likelihood import ode_bits_per_dim, ode_log_likelihood
from diffusion.processes import schedules
from diffusion.processes.analytic import GaussianOracle
from diffusion.processes.ncsn import NCSN
from diffusion.processes.prediction import Predictor
from diffusion.processes.sde import VESDE, VPSDE, SubVPSDE
from diffusion.training.objective import Objective
from diffusion.training.weighting import Likelihood, Simple

MEAN, STD = 0.4, 0.3
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=50.0)}


def GaussianEpsOracle(process, mean, std) -> Predictor:
    """The exact ε-network for N(mean, std²) data, seen through the process."""
    return Predictor(GaussianOracle(process, mean, std), process)


def test_vp_sde_discretized_with_1000_steps_is_ddpm_linear_schedule():
    beta = VPSDE(beta_min=0.1, beta_max=20.0).discrete_beta(1000)
    assert torch.allclose(beta, schedules.linear(1000).double(), rtol=0, atol=1e-12)
    # after i + 1 steps of that chain (DDPM's code index i) the SDE is at time t = (i + 1) / N,
    # up to log(1 - β) = -β + O(β²) and the Riemann sum's error:
    # |log ᾱ_i - log m(t)²| <= Σ_{j<=i} β_j² + (β_max - β_min)(i + 1) / N²
    i = torch.tensor([0, 10, 100, 500, 999])
    alpha_bar = torch.cumprod(1 - beta, 0)[i]
    m_sde, _ = VPSDE().marginal((i + 1).double() / 1000)
    bound = torch.cumsum(beta**2, 0)[i] + 19.9 * (i + 1) / 1000**2
    assert ((alpha_bar.log() - 2 * m_sde.log()).abs() <= bound).all()
    assert bound[-1] < 0.16  # on log ᾱ_T = -10.1


@pytest.mark.parametrize("name", SDES)
def test_marginals_solve_the_sdes_moment_equations(name):
    """m' = f m and v' = 2 f v + g² (v = σ², from v(0) = σ(0)²), integrated numerically."""
    sde = SDES[name]
    t = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    f, g = sde.coefficients(t)
    dt = t[1] - t[0]
    m0, s0 = sde.marginal(t[:1])
    log_m = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumsum((f[1:] + f[:-1]) / 2 * dt, 0)]
    )
    m = m0 * log_m.exp()
    # v(t) = m(t)² (v0 + ∫ g² / m² ds), the variance ODE's solution
    integrand = g**2 / m**2
    inner = torch.cumsum((integrand[1:] + integrand[:-1]) / 2 * dt, 0)
    v = m**2 * (s0**2 + torch.cat([torch.zeros(1, dtype=torch.float64), inner]))
    m_closed, sigma_closed = sde.marginal(t)
    every = slice(0, None, 20_000)
    assert torch.allclose(m[every], m_closed[every], rtol=1e-7)
    assert torch.allclose(v[every].sqrt(), sigma_closed[every], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [*SDES, "ncsn"])
def test_score_from_the_eps_oracle_is_the_gradient_of_the_log_density(name):
    process = SDES.get(name) or NCSN()
    oracle = GaussianEpsOracle(process, MEAN, STD)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    at = torch.tensor([0.0, 3.0, 6.0, 9.0], dtype=torch.float64) if name == "ncsn" else t
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    label = process.label(at)
    m, sigma = process.moments_at_label(label)
    shape = (-1, 1, 1, 1)
    density = torch.distributions.Normal(
        (m * MEAN).reshape(shape), (m**2 * STD**2 + sigma**2).sqrt().reshape(shape)
    )
    (grad,) = torch.autograd.grad(density.log_prob(x).sum(), x)
    with torch.no_grad():
        score = oracle(x, at).score
    assert torch.allclose(score, grad, rtol=1e-10)
    if name == "ncsn":  # level t is the paper's σ_{L-t}: the labels are the VE-SDE's of σ
        assert torch.allclose(process.marginal(at)[1], process.sigmas.flip(0)[[0, 3, 6, 9]])


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("weighting", ["sde", "likelihood"])
def test_denoising_score_matching_loss_of_the_exact_predictor_is_its_closed_form(name, weighting):
    """E‖ε* - z‖² per dimension = Var(z | x_t) = m² s² / (m² s² + σ²) (times g²/σ²)."""
    sde = SDES[name]
    x0 = MEAN + STD * torch.randn(20_000, 1, 2, 2, dtype=torch.float64)
    t = torch.full((x0.shape[0],), 0.4, dtype=torch.float64)
    objective = Objective(sde, "eps", Likelihood() if weighting == "likelihood" else Simple())
    loss = objective(GaussianOracle(sde, MEAN, STD), x0, t).mean()
    m, sigma = sde.marginal(t[:1])
    expected = m**2 * STD**2 / (m**2 * STD**2 + sigma**2)
    if weighting == "likelihood":
        expected = expected * (sde.coefficients(t[:1])[1] / sigma) ** 2
    assert float(loss) == pytest.approx(float(expected), rel=0.02)


# sampler, process, options, NFE, tolerance on the std (relative): Langevin steps (PC's corrector
# at snr 0.16, annealed Langevin) carry a small known bias; EM and the ODE do not.
CASES = {
    "em-vp": (S.euler_maruyama, "vp", {"steps": 1000}, 1000, 0.01),
    "em-subvp": (S.euler_maruyama, "subvp", {"steps": 1000}, 1000, 0.01),
    "em-ve": (S.euler_maruyama, "ve", {"steps": 1000}, 1000, 0.01),
    "pc-vp": (S.predictor_corrector, "vp", {"steps": 500}, 1000, 0.03),
    "pc-ve": (S.predictor_corrector, "ve", {"steps": 500}, 1000, 0.03),
    "pc-em-subvp": (
        S.predictor_corrector, "subvp", {"steps": 500, "predictor": "euler_maruyama"}, 1000, 0.03,
    ),
    "ode-vp": (S.probability_flow, "vp", {}, None, 0.01),
    "ode-subvp": (S.probability_flow, "subvp", {}, None, 0.01),
    "ode-ve": (S.probability_flow, "ve", {}, None, 0.01),
    "annealed-langevin": (S.annealed_langevin, "ncsn", {}, 1001, 0.04),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_every_sampler_driven_by_the_exact_score_reproduces_gaussian_data(case):
    sampler, name, options, nfe, tolerance = CASES[case]
    process = SDES.get(name) or NCSN()
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(250, 1, 16, 16, generator=generator)
    steps = []
    out = sampler(
        GaussianEpsOracle(process, MEAN, STD), x_T, process,
        generator=generator, callback=steps.append, **options,
    )  # fmt: skip
    assert float(out.mean()) == pytest.approx(MEAN, abs=0.006)
    assert float(out.std()) == pytest.approx(STD, rel=tolerance)
    assert steps[-1].nfe == (nfe or steps[-1].nfe)
    if nfe is None:  # adaptive: a handful of evaluations, not hundreds
        assert 20 <= steps[-1].nfe <= 200


def test_stochastic_samplers_are_reproducible_from_a_seed_and_the_ode_needs_none():
    sde, oracle = SDES["vp"], GaussianEpsOracle(SDES["vp"], MEAN, STD)
    x_T = torch.randn(8, 1, 4, 4)
    runs = [
        S.euler_maruyama(oracle, x_T, sde, steps=50, generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(S.probability_flow(oracle, x_T, sde), S.probability_flow(oracle, x_T, sde))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="predictor must be"):
        S.predictor_corrector(None, torch.zeros(1, 1, 2, 2), SDES["vp"], predictor="heun")
    with pytest.raises(ValueError, match="t_min must be in"):
        VPSDE(t_min=0.0)
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=30.0, beta_max=20.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="num_levels >= 2"):
        NCSN(num_levels=1)


def test_vp_time_of_inverts_the_mean_coefficient():
    sde = VPSDE()
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    m, _ = sde.marginal(t)
    assert torch.allclose(sde.time_of(m**2), t, rtol=1e-10)


@pytest.mark.parametrize("name", SDES)
def test_probability_flow_log_likelihood_of_gaussian_data_is_the_analytic_log_density(name):
    """log p_ε(x) through the ODE with the exact score vs log N(x; 0, m² s² + σ²) at ε.

    Zero-mean data, so that the prior N(0, prior_std²) is the exact marginal at t = 1 to 1e-5
    (with a mean μ, VP's m(1) μ = 0.003 offset alone costs ~0.01 nats)."""
    sde = SDES[name]
    x = STD * torch.randn(16, 1, 2, 2, dtype=torch.float64)
    log_p, nfe = ode_log_likelihood(GaussianEpsOracle(sde, 0.0, STD), x)
    m, sigma = sde.marginal(torch.tensor([sde.t_min], dtype=torch.float64))
    exact = torch.distributions.Normal(0.0, (m**2 * STD**2 + sigma**2).sqrt())
    expected = exact.log_prob(x).flatten(1).sum(1)
    assert torch.allclose(log_p, expected, atol=2e-3), (log_p - expected).abs().max()
    assert 10 < nfe < 500


def test_bits_per_dim_of_the_right_gaussian_beats_a_wrong_one():
    """Dequantized 8-bit Gaussian images: the model of their own distribution scores lower."""
    sde = SDES["vp"]
    g = torch.Generator().manual_seed(0)
    pixels = ((MEAN + STD * torch.randn(32, 1, 2, 2, generator=g) + 1) * 127.5).round()
    pixels = pixels.clamp(0, 255).to(torch.uint8)
    right, _ = ode_bits_per_dim(GaussianEpsOracle(sde, MEAN, STD), pixels, g)
    wrong, _ = ode_bits_per_dim(GaussianEpsOracle(sde, -MEAN, STD), pixels, g)
    # the entropy of N(μ, s²) per dim, in bits, plus the bin offset log2(127.5)
    entropy = 0.5 * math.log2(2 * math.pi * math.e * STD**2) + math.log2(127.5)
    assert float(right.mean()) == pytest.approx(entropy, abs=0.35)
    assert float(wrong.mean()) > float(right.mean()) + 1.0

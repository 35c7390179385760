"""Prediction targets: conversions between ε, x_0, v and the score, on every kernel, at the ends
of DDPM's time range (t = 0 and t = T - 1, where off-by-one bugs live)."""

import pytest
import torch

from diffusion.processes import schedules
from diffusion.processes.ddpm import GaussianDiffusion
from diffusion.processes.kernel import per_example
from diffusion.processes.ncsn import NCSN
from diffusion.processes.prediction import (
    Prediction,
    Predictor,
    eps_x0_from,
    mse_factor,
    target_value,
)
from diffusion.processes.sde import VESDE, VPSDE

DDPM = GaussianDiffusion(schedules.linear(1000))
KERNELS = {  # a process and times at its two ends and in the middle
    "ddpm": (DDPM, torch.tensor([0, 1, 500, 998, 999])),
    "vp_sde": (VPSDE(), torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)),
    "ve_sde": (VESDE(), torch.tensor([1e-5, 0.5, 1.0], dtype=torch.float64)),
    "ncsn": (NCSN(), torch.tensor([0, 5, 9])),
}


def batch(process, t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(len(t), 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    m, sigma = (per_example(v.double(), x0) for v in process.marginal(t))
    return x0, eps, m, sigma, m * x0 + sigma * eps


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_each_target_returns_the_true_eps_and_x0(name, target):
    x0, eps, m, sigma, x_t = batch(*KERNELS[name])
    eps_hat, x0_hat = eps_x0_from(target, target_value(target, x0, eps, m, sigma), x_t, m, sigma)
    assert torch.allclose(eps_hat, eps, atol=1e-9) and torch.allclose(x0_hat, x0, atol=1e-9)
    # the control: another output gives another x̂_0
    other = target_value(target, x0, eps, m, sigma) + 0.1
    assert not torch.allclose(eps_x0_from(target, other, x_t, m, sigma)[1], x0, atol=1e-3)


def test_v_is_salimans_and_hos_for_ddpm():
    """v = √ᾱ ε - √(1 - ᾱ) x_0 (Salimans & Ho 2022, Sec. 4), and x_0 = √ᾱ x_t - √(1 - ᾱ) v."""
    x0, eps, m, sigma, x_t = batch(*KERNELS["ddpm"])
    t = KERNELS["ddpm"][1]
    ab = per_example(DDPM.alpha_bar[t].double(), x0)
    v = target_value("v", x0, eps, m, sigma)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-6)
    assert torch.allclose(ab.sqrt() * x_t - (1 - ab).sqrt() * v, x0, atol=1e-6)


@pytest.mark.parametrize("name", KERNELS)
def test_mse_factors_relate_each_targets_error_to_the_x0_error(name):
    """At fixed x_t, ‖ε - ε̂‖² = SNR ‖x_0 - x̂_0‖², ‖v - v̂‖² = (m² + σ²)² / σ² ‖x_0 - x̂_0‖²."""
    x0, eps, m, sigma, x_t = batch(*KERNELS[name])
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, dtype=torch.float64)
    eps_hat = (x_t - m * x0_hat) / sigma  # the prediction consistent with x_t
    err = {
        "x0": (x0 - x0_hat).pow(2),
        "eps": (eps - eps_hat).pow(2),
        "v": (target_value("v", x0, eps, m, sigma) - target_value("v", x0_hat, eps_hat, m, sigma))
        .pow(2),
    }  # fmt: skip
    for target in ("eps", "v"):
        assert torch.allclose(err[target], mse_factor(target, m, sigma) * err["x0"], rtol=1e-9)
    if name in ("ddpm", "vp_sde"):  # VP: the v factor is SNR + 1
        assert torch.allclose(mse_factor("v", m, sigma), (m / sigma) ** 2 + 1, rtol=1e-6)


def test_score_is_the_gaussian_score_and_clipping_keeps_x_t():
    """For x_0 ~ N(μ, s²), q(x_t) = N(m μ, m² s² + σ²): ε* gives its score exactly; clipping x̂_0
    recomputes ε̂ so that x_t = m x̂_0 + σ ε̂ still holds."""
    mu, s = 0.3, 0.5
    t = torch.tensor([999, 500, 10])
    x_t = torch.tensor([0.2, -1.0, 2.0], dtype=torch.float64).view(3, 1)
    m, sigma = (v.double().view(3, 1) for v in DDPM.marginal(t))
    var = m**2 * s**2 + sigma**2
    eps_star = sigma * (x_t - m * mu) / var
    pred = Prediction(x_t, m, sigma, eps_star, (x_t - sigma * eps_star) / m)
    assert torch.allclose(pred.score, -(x_t - m * mu) / var, rtol=1e-12)
    clipped = pred.clipped()
    assert clipped.x0_hat.abs().max() <= 1.0 and pred.x0_hat.abs().max() > 1.0
    assert torch.allclose(m * clipped.x0_hat + sigma * clipped.eps_hat, x_t, atol=1e-12)


def test_predictor_reads_a_learned_variance_from_the_second_half():
    net = lambda x, label: torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], 1)  # noqa
    x, t = torch.ones(2, 3, 4, 4), torch.tensor([0, 9])
    pred = Predictor(net, DDPM, "eps", learn_sigma=True)(x, t)
    assert pred.eps_hat.shape == x.shape and torch.equal(pred.var_frac, torch.full(x.shape, 0.75))
    fixed = Predictor(lambda x, label: torch.zeros_like(x), DDPM, "eps")
    assert fixed(torch.ones(2, 3, 4, 4), torch.tensor([0, 9])).var_frac is None
    with pytest.raises(ValueError, match=r"prediction must be one of \['eps', 'x0', 'v', 'edm'\]"):
        Predictor(net, DDPM, "score")

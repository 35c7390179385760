"""The Gaussian diffusion process against closed forms (diffusion.process)."""

import pytest
import torch

from diffusion import schedules
from diffusion.process import GaussianDiffusion

T = 1000
ENDS = [0, 1, T // 2, T - 1]  # code indices: t = 0 is the step next to the data


@pytest.fixture(scope="module")
def process():
    return GaussianDiffusion(schedules.linear(T))


def test_alpha_bar_prev_starts_at_one(process):
    assert process.alpha_bar_prev[0].item() == 1.0
    assert torch.equal(process.alpha_bar_prev[1:], process.alpha_bar[:-1])


@pytest.mark.parametrize("t", ENDS)
def test_posterior_variance_formula(process, t):
    beta = schedules.linear(T)
    alpha_bar = torch.cumprod(1 - beta, 0)
    prev = alpha_bar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    expected = (1 - prev) / (1 - alpha_bar[t]) * beta[t]
    assert process.posterior_var[t].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)
    if t == 0:
        assert process.posterior_var[0].item() == 0.0
        # the clipped log variance has no log(0)
        assert torch.isfinite(process.posterior_log_var_clipped).all()


@pytest.mark.parametrize("t", ENDS)
def test_posterior_is_gaussian_conditioning(process, t):
    """μ̃, β̃ equal the Bayes posterior of x_{t-1} given x_t and x_0 (scalar Gaussians)."""
    x0, x_t = torch.tensor([[0.7]]), torch.tensor([[-0.4]])
    tt = torch.tensor([t])
    mean, var = process.q_posterior(x0, x_t, tt)
    beta = schedules.linear(T)  # float64: the reference is computed at full precision
    a, b = 1 - beta[t], beta[t]
    ab_prev = torch.cumprod(1 - beta, 0)[t - 1] if t > 0 else None
    if t == 0:  # x_{t-1} is x_0 itself: a point mass
        assert mean.item() == pytest.approx(0.7, abs=1e-6) and var.item() == 0.0
        return
    precision = 1 / (1 - ab_prev) + a / b
    exp_mean = (ab_prev.sqrt() * 0.7 / (1 - ab_prev) + a.sqrt() * -0.4 / b) / precision
    assert mean.item() == pytest.approx(exp_mean.item(), rel=1e-4, abs=1e-6)
    assert var.item() == pytest.approx((1 / precision).item(), rel=1e-4)


@pytest.mark.parametrize("t", ENDS)
def test_q_sample_moments(process, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((200_000, 1), 0.5)
    tt = torch.full((x0.shape[0],), t)
    x_t = process.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
    alpha_bar = process.alpha_bar[t].item()
    assert x_t.mean().item() == pytest.approx(alpha_bar**0.5 * 0.5, abs=4e-3)
    assert x_t.var().item() == pytest.approx(1 - alpha_bar, rel=2e-2, abs=1e-7)
    mean, var = process.q_mean_var(x0[:1], tt[:1])
    assert mean.item() == pytest.approx(alpha_bar**0.5 * 0.5, rel=1e-6)
    assert var.item() == pytest.approx(1 - alpha_bar, rel=1e-5, abs=1e-9)


def test_one_step_chain_matches_one_shot_marginal():
    """Iterating q(x_t | x_{t-1}) from x_0 gives q(x_t | x_0)'s moments, both ends."""
    proc = GaussianDiffusion(schedules.cosine(50))
    g = torch.Generator().manual_seed(0)
    x = torch.full((100_000,), -0.8)
    for t in range(proc.T):
        tt = torch.full((x.shape[0],), t)
        x = proc.q_step(x, tt, torch.randn(x.shape, generator=g))
        if t in (0, proc.T // 2, proc.T - 1):
            ab = proc.alpha_bar[t].item()
            assert x.mean().item() == pytest.approx(ab**0.5 * -0.8, abs=5e-3)
            assert x.var().item() == pytest.approx(1 - ab, rel=2e-2)


@pytest.mark.parametrize("t", ENDS)
def test_eps_x0_round_trips(process, t):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    tt = torch.full((8,), t)
    x_t = process.q_sample(x0, tt, eps)
    assert torch.allclose(
        process.eps_from_x0(x_t, tt, process.x0_from_eps(x_t, tt, eps)), eps, atol=1e-4
    )
    # recovering x0 divides by √ᾱ_t, tiny at t = T-1: compare with a tolerance scaled by it
    tol = 1e-5 / process.sqrt_alpha_bar[t].item()
    assert torch.allclose(process.x0_from_eps(x_t, tt, eps), x0, atol=tol)


def test_score_from_eps_is_the_gaussian_score(process):
    """For x_0 ~ N(μ, s²), q(x_t) = N(√ᾱ μ, ᾱ s² + 1 - ᾱ); ε* gives its score exactly."""
    mu, s = 0.3, 0.5
    t = torch.tensor([10, 500, 999])
    x_t = torch.tensor([0.2, -1.0, 2.0]).view(3, 1)
    ab = process.alpha_bar[t].view(3, 1)
    var = ab * s**2 + 1 - ab
    eps_star = (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / var
    assert torch.allclose(
        process.score_from_eps(x_t, t, eps_star), -(x_t - ab.sqrt() * mu) / var, rtol=1e-5
    )


def test_p_mean_without_clipping_is_algorithm_2(process):
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    eps_hat = torch.randn(x_t.shape, generator=g)
    out = process.p_mean_var(lambda x, tt: eps_hat, x_t, t, variance="beta_tilde", clip_x0=False)
    a = process.alpha[t].view(4, 1, 1, 1)
    b = process.beta[t].view(4, 1, 1, 1)
    sqrt_1m_ab = process.sqrt_one_minus_alpha_bar[t].view(4, 1, 1, 1)
    expected = (x_t - b / sqrt_1m_ab * eps_hat) / a.sqrt()
    assert torch.allclose(out["mean"], expected, atol=1e-5)
    beta_var = process.p_mean_var(lambda x, tt: eps_hat, x_t, t, variance="beta")["var"]
    assert torch.allclose(beta_var.flatten(), process.beta[t])
    with pytest.raises(ValueError, match="beta_tilde"):
        process.p_mean_var(lambda x, tt: eps_hat, x_t, t, variance="large")


def test_clip_x0_bounds_the_prediction(process):
    x_t = torch.full((1, 1, 2, 2), 3.0)
    out = process.p_mean_var(
        lambda x, t: -torch.ones_like(x), x_t, torch.tensor([999]), clip_x0=True
    )
    assert out["x0_hat"].abs().max().item() <= 1.0


def test_loss_simple_is_zero_for_the_true_noise(process):
    x0 = torch.rand(6, 1, 4, 4)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 2, 500, 998, 999])
    oracle = lambda x_t, tt: process.eps_from_x0(x_t, tt, x0)  # noqa: E731
    loss = process.loss_simple(oracle, x0, t, eps)
    assert loss.shape == (6,) and loss.max().item() < 1e-6
    assert process.loss_simple(lambda x, tt: torch.zeros_like(x), x0, t, eps).mean().item() > 0.5


def test_single_step_process_T1():
    proc = GaussianDiffusion(schedules.linear(1))
    assert proc.T == 1 and proc.posterior_var[0].item() == 0.0
    assert torch.isfinite(proc.posterior_log_var_clipped).all()


def test_invalid_beta_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))

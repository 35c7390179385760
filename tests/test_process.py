"""The Gaussian diffusion process against closed forms (diffusion.process)."""

import pytest
import torch

from diffusion.processes import schedules
from diffusion.processes.ddpm import GaussianDiffusion

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


def test_single_step_process_T1():
    proc = GaussianDiffusion(schedules.linear(1))
    assert proc.T == 1 and proc.posterior_var[0].item() == 0.0
    assert torch.isfinite(proc.posterior_log_var_clipped).all()


def test_invalid_beta_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))
